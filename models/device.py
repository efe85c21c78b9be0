"""Models: choose where training runs, before any model is built.

In: whether the caller demands a GPU. Out: ``DeviceInfo`` saying what TensorFlow sees and which Keras
dtype policy is now global. On a GPU the policy becomes ``mixed_float16`` (the builders keep their output
layers in float32, so losses and softmaxes stay exact) and memory growth is turned on; on CPU the policy is
``float32``. If a GPU was demanded and TensorFlow sees none, this fails instead of training on CPU: a
Dask resource annotation is easy to lose, and a silent CPU run would take hours.

Call it once per process, first thing in the training step: TensorFlow fixes device settings when it
initialises, and the dtype policy applies to layers built after it is set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import tensorflow as tf

from audiopipe.infra.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """Where training runs.

    Attributes:
        kind: ``gpu`` or ``cpu``.
        devices: TensorFlow's names of the GPUs used (empty on CPU).
        dtype_policy: The global Keras dtype policy now set (``mixed_float16`` or ``float32``).
    """

    kind: str
    devices: tuple[str, ...]
    dtype_policy: str

    @property
    def mixed_precision(self) -> bool:
        return self.dtype_policy == "mixed_float16"


def select_device(require_gpu: bool, *, mixed_precision: bool = True) -> DeviceInfo:
    """Use the GPUs TensorFlow sees, or the CPU; set the global Keras dtype policy to match.

    Args:
        require_gpu: Fail unless TensorFlow sees at least one GPU.
        mixed_precision: On GPU, use ``mixed_float16`` (False keeps ``float32``).

    Returns:
        The ``DeviceInfo``.

    Raises:
        ConfigError: If ``require_gpu`` and no GPU is visible.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        if require_gpu:
            raise ConfigError(
                "a GPU was required (--gpu) but TensorFlow sees none on this worker "
                f"(TensorFlow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}); "
                "check that the task landed on a worker started with the GPU resource and that a CUDA "
                "build of TensorFlow is installed there. Refusing to train on CPU.")
        keras.mixed_precision.set_global_policy("float32")
        log.info("training on CPU: TensorFlow sees no GPU; dtype policy float32")
        return DeviceInfo(kind="cpu", devices=(), dtype_policy="float32")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier call in this process: keep its setting
            pass
    policy = "mixed_float16" if mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    names = tuple(gpu.name for gpu in gpus)
    log.info("training on GPU %s; dtype policy %s", ", ".join(names), policy)
    return DeviceInfo(kind="gpu", devices=names, dtype_policy=policy)
