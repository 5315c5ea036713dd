"""kfax: K-FAC for JAX, as an optax gradient transformation for Flax models."""

from kfax._accumulate import accumulate as accumulate
from kfax._capture import value_grad_and_stats as value_grad_and_stats
from kfax._losses import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from kfax._losses import softmax_cross_entropy as softmax_cross_entropy
from kfax._losses import squared_error as squared_error
from kfax._quadratic import QuadraticModelState as QuadraticModelState
from kfax._quadratic import quadratic_model as quadratic_model
from kfax._summary import summary as summary
from kfax._table import LayerTable as LayerTable
from kfax._transform import KfacState as KfacState
from kfax._transform import kfac as kfac
from kfax._transform import partition_specs as partition_specs

__version__ = '0.2.0'

__all__ = (
    'KfacState',
    'LayerTable',
    'accumulate',
    'kfac',
    'partition_specs',
    'QuadraticModelState',
    'quadratic_model',
    'sigmoid_binary_cross_entropy',
    'softmax_cross_entropy',
    'squared_error',
    'summary',
    'value_grad_and_stats',
)
