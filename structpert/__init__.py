"""structpert: differentiable perturbed optimizers and Fenchel-Young losses for JAX."""

from . import datasets as datasets, metrics as metrics, perturbations as perturbations
from ._losses import FenchelYoungLoss as FenchelYoungLoss
from ._noise import AbstractNoise as AbstractNoise, Gumbel as Gumbel, Normal as Normal
from ._perturbed import (
    MonteCarloStats as MonteCarloStats,
    PerturbedOptimizer as PerturbedOptimizer,
)
from ._solvers.base import (
    AbstractBatchedSolver as AbstractBatchedSolver,
    AbstractSolver as AbstractSolver,
    FunctionSolver as FunctionSolver,
    list_solvers as list_solvers,
    make_solver as make_solver,
    register_solver as register_solver,
)
from ._solvers.graph_shortest_path import GraphShortestPath as GraphShortestPath
from ._solvers.grid_shortest_path import GridShortestPath as GridShortestPath
from ._solvers.host import HostSolver as HostSolver
from ._solvers.matching import BipartiteMatching as BipartiteMatching
from ._solvers.permutahedron import Permutahedron as Permutahedron
from ._solvers.simplex import Simplex as Simplex
from ._solvers.topk import TopK as TopK


__version__ = "0.1.0"
