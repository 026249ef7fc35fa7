"""Mask kernels: one contract (:mod:`dropgrad.kernels.common`), one module per kernel.

* :mod:`~dropgrad.kernels.reference` -- plain eager torch, any device, dtype and
  layout: the readable definition every fast kernel must match bit for bit;
* :mod:`~dropgrad.kernels.cpu` -- one C pass over all CPU gradients of a step
  (OpenMP), built with the system compiler in the background;
* :mod:`~dropgrad.kernels.cuda` -- one Triton launch per dtype for CUDA gradients.

:func:`dropgrad.functional.apply_masks_` is the only dispatcher: it picks the
kernel per (device, servability) group, once per call.
"""
