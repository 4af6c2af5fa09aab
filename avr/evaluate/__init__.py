"""Evaluation: the one scoring path (score), the field's metrics, the evaluator of `avr eval`, its
reports, per-query tables, search and the first-stage index.

The package is also the Python API's ``avr.evaluate(run, ...)``: called, it evaluates a run
(``avr.api.evaluate``), so that ``avr.evaluate`` is one name whether it is imported or called.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from avr.api import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
