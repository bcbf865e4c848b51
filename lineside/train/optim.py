"""torch.optim without torch._dynamo, PyTorch's compiler front end, which lineside does not use.

torch.optim imports torch._dynamo (1.3 s on 2 cores) in two places that only matter under
torch.compile:
- Optimizer's add_param_group, zero_grad, state_dict and load_state_dict are wrapped by
  torch._compile._disable_dynamo, which on its first call imports it to build a wrapper and
  caches that on the function as `__dynamo_disable`;
- every step goes through optimizer._use_grad_for_differentiable, whose `_use_grad` imports
  it for two graph breaks (no-ops outside compilation) around setting grad mode.
`without_dynamo()` fills the first cache with the function itself (while torch._dynamo is not
loaded; lineside calls it before making an optimizer), and `AdamW.step` does what `_use_grad`
does, less the graph breaks. Each applies only
where torch has exactly that wrapper; otherwise torch's own path runs as it is.
"""

from __future__ import annotations

import inspect
import sys

import torch


def without_dynamo() -> None:
    """Fill _disable_dynamo's cache of Optimizer's methods with the functions themselves."""
    if "torch._dynamo" in sys.modules:
        return
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        wrapper = vars(torch.optim.Optimizer).get(name)
        fn = getattr(wrapper, "__wrapped__", None)
        code = getattr(wrapper, "__code__", None)
        if fn is not None and code is not None and "__dynamo_disable" in code.co_consts:   # the cache it reads
            setattr(fn, "__dynamo_disable", fn)


def _plain_step(cls: type):
    """cls.step without torch.optim's `_use_grad` wrapper (the one that imports torch._dynamo),
    or None where the step is not wrapped by exactly that."""
    step = inspect.unwrap(getattr(cls, "step"), stop=lambda f: getattr(getattr(f, "__code__", None), "co_name", "")
                          == "_use_grad")
    code = getattr(step, "__code__", None)
    if code is None or code.co_name != "_use_grad" or "graph_break" not in code.co_names:
        return None
    return getattr(step, "__wrapped__", None)


_ADAMW_STEP = _plain_step(torch.optim.AdamW)


def _step(self, closure=None):
    """What torch.optim's `_use_grad` does around the step (grad mode set to the optimizer's
    `differentiable`, then restored), less the graph breaks for torch.compile."""
    prev = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(self.defaults["differentiable"])
        return _ADAMW_STEP(self, closure)
    finally:
        torch.set_grad_enabled(prev)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step does not import torch._dynamo (see the module's text);
    where torch's step is not wrapped as expected, torch's own step."""

    if _ADAMW_STEP is not None:
        step = _step

    def __init__(self, *args, **kwargs):
        without_dynamo()      # the constructor calls add_param_group
        super().__init__(*args, **kwargs)
