"""Self-checks for the exercises: run a student's function against the reference on several inputs.

Each ``check_*`` prints one line when every case passes. Otherwise it raises ``AssertionError``
naming the case, the output, the first element that is off, and the expected and actual values.

A function that is still the student edition's stub (it raises ``NotImplementedError``) is not an
error: the check prints ``NOT ATTEMPTED`` and returns, so "Run All" goes on to the end. A later
cell that needs the student's function asks ``solution_or_reference(fn, reference)``: the
student's function once its check has passed, the course's reference (said in one line) until then.

The checks live in one module per chapter, named as the chapter's folder in ``chapters/``; the labs
call them from here (``checks.check_forward(...)``), which re-exports them all:

- ``scratch``: Batch normalization from scratch;
- ``pytorch``: Batch norm as a PyTorch module;
- ``covariate_shift``: Internal covariate shift, measured;
- ``regularization``: Batch norm as a regularizer;
- ``small_batches``: Small and non-i.i.d. batches;
- ``alternatives``: The alternatives: LayerNorm, InstanceNorm, GroupNorm, RMSNorm;
- ``transfer``: Batch norm and transfer learning;
- ``gpu``: Batch norm on the GPU: fused Triton kernels;
- ``distributed``: Batch norm across devices;
- ``beyond``: Beyond batch norm: deep networks without it.

Each module's docstring says which lab calls which check. ``_common`` holds what they share: the
``_self_check`` decorator that makes a ``check_*`` a self-check, one record of the functions that
passed for all chapters (``passed``, ``solution_or_reference``), ``assert_close`` and the
``NOT_ATTEMPTED`` marker. A new check goes into its chapter's module and its name into ``__all__``.
"""

from normlab.checks._common import NOT_ATTEMPTED as NOT_ATTEMPTED  # read by the grader and nbval_stubs
from normlab.checks._common import SELF_CHECK as SELF_CHECK  # what a self-check cell calls
from normlab.checks._common import STUB as STUB  # the student edition's stub, and its message's end
from normlab.checks._common import STUB_SUFFIX as STUB_SUFFIX
from normlab.checks._common import assert_close, passed, solution_or_reference
from normlab.checks._common import stub_messages as stub_messages
from normlab.checks.alternatives import (
    check_adain,
    check_group_norm,
    check_layer_norm_backward,
    check_sequence_norm,
    check_steps_to_target,
    check_style_loss,
)
from normlab.checks.beyond import (
    check_agc,
    check_block_placement,
    check_bn_output_std,
    check_bn_share,
    check_dyt,
    check_record_outputs,
)
from normlab.checks.covariate_shift import check_block_growth, check_drift_ratio, check_largest_rate, check_noise
from normlab.checks.distributed import check_merge_moments, check_sync_backward
from normlab.checks.gpu import check_chan_merge, check_channel_sums, check_triton_sums
from normlab.checks.pytorch import check_bn_backward, check_bn_module, check_cumulative_average, check_fold
from normlab.checks.regularization import (
    check_ema_weights,
    check_ghost_forward,
    check_ghost_running,
    check_measured_noise,
    check_predicted_noise,
    check_variance_shift,
)
from normlab.checks.scratch import (
    check_backward,
    check_block_backward,
    check_block_forward,
    check_forward,
    check_running_stats,
)
from normlab.checks.small_batches import check_batch_renorm, check_grad_accumulation
from normlab.checks.transfer import (
    check_adabn,
    check_beta_for_fraction,
    check_blur,
    check_bn_only,
    check_freeze_bn,
    check_prior_mix,
    check_set_mode,
)

__all__ = [
    "assert_close",
    "passed",
    "solution_or_reference",
    "check_forward",
    "check_backward",
    "check_running_stats",
    "check_block_forward",
    "check_block_backward",
    "check_bn_backward",
    "check_cumulative_average",
    "check_fold",
    "check_drift_ratio",
    "check_noise",
    "check_block_growth",
    "check_predicted_noise",
    "check_ghost_forward",
    "check_variance_shift",
    "check_batch_renorm",
    "check_grad_accumulation",
    "check_group_norm",
    "check_adain",
    "check_steps_to_target",
    "check_layer_norm_backward",
    "check_adabn",
    "check_prior_mix",
    "check_blur",
    "check_chan_merge",
    "check_channel_sums",
    "check_triton_sums",
    "check_merge_moments",
    "check_sync_backward",
    "check_bn_module",
    "check_largest_rate",
    "check_ghost_running",
    "check_measured_noise",
    "check_ema_weights",
    "check_sequence_norm",
    "check_style_loss",
    "check_bn_only",
    "check_beta_for_fraction",
    "check_freeze_bn",
    "check_set_mode",
    "check_record_outputs",
    "check_bn_output_std",
    "check_bn_share",
    "check_agc",
    "check_block_placement",
    "check_dyt",
]
