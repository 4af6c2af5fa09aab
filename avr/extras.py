"""Optional dependencies: a module an install may lack, imported where it is needed.

A base install extracts, trains, evaluates and searches; dask, HDF5, faiss, Optuna, TensorBoard,
Parquet, the service and the experiment loggers come with extras (pyproject's
``[project.optional-dependencies]``). ``require`` imports one of them or fails with one line
naming the ``pip install`` that adds it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from avr.errors import MissingExtraError

# module -> the extra that installs it
EXTRA_OF = {
    "dask": "dask", "dask.array": "dask", "distributed": "dask",
    "h5py": "h5",
    "pyarrow": "parquet", "pyarrow.parquet": "parquet", "datasets": "hf",
    "faiss": "index",
    "optuna": "sweep",
    "psycopg": "postgres", "s3fs": "s3", "wandb": "wandb", "mlflow": "mlflow",
    "torch.utils.tensorboard": "tensorboard", "tensorboard": "tensorboard",
    "starlette": "serve", "uvicorn": "serve",
}


def require(module: str, what: str) -> ModuleType:
    """``module`` imported; if it is not installed, MissingExtraError naming ``what`` needs it
    and the ``pip install`` of its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and not module.startswith(error.name.split(".")[0]):
            raise  # the module is there but one of its own imports failed: show that
        extra = EXTRA_OF.get(module, module.split(".")[0])
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'avr[{extra}]'") from None
