"""tf_moe: Sparsely-Gated Mixture-of-Experts layers for Keras 3 on TensorFlow.

Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", ICLR 2017.
"""

from tf_moe import allocator as _allocator

_allocator.use_pooled_cpu_allocator()

import keras as _keras  # noqa: E402

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "tf_moe needs the TensorFlow backend of Keras 3, but Keras is running "
        f"on the {_keras.backend.backend()!r} backend. Set the environment "
        "variable KERAS_BACKEND=tensorflow before importing keras.")

from tf_moe.balance import balancing_loss
from tf_moe.balance import cv_squared
from tf_moe.balance import importance
from tf_moe.balance import smooth_load
from tf_moe.balanced_gating import BatchwiseGate
from tf_moe.balanced_gating import ExpertChoiceGate
from tf_moe.experts import Experts
from tf_moe.gating import Gate
from tf_moe.gating import GateOutput
from tf_moe.gating import RouterStatistics
from tf_moe.hierarchical import HierarchicalMoE
from tf_moe.moe import MoE
from tf_moe.plan import DispatchPlan
from tf_moe.plan import make_dispatch_plan
from tf_moe.routers import GATES
from tf_moe.top_k_gating import NoisyTopKGate
from tf_moe.top_k_gating import TopKGate
from tf_moe.upcycle import upcycle
from tf_moe import allocator
from tf_moe import dispatch
from tf_moe import distribution
from tf_moe import kernels
from tf_moe import optimizers
from tf_moe import recurrent
from tf_moe import sharding

__version__ = "0.1.0"
