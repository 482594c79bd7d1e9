"""``@meshrun.job(gpus=1)``: a plain call still runs in-process; ``.submit()`` and ``.map()`` make jobs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, ParamSpec, TypeVar, overload

from ._errors import SpecError
from ._options import PlacementOptions
from ._spec import JobSpec

if TYPE_CHECKING:
    from ._job import Job

P = ParamSpec("P")
R = TypeVar("R")

class JobFunction(Generic[P, R]):
    """A function with a job spec attached. Calling it runs it here, as if undecorated.

    Typed like the function it wraps: for ``def f(x: int) -> float``, ``f.submit(1)`` is a
    ``Job[float]`` and ``f.submit("a")`` is a type error."""

    def __init__(self, fn: Callable[P, R], fields: dict[str, Any]):
        self.__meshrun_function__ = fn
        self._fields = dict(fields)
        self._plan = PlacementOptions.split(self._fields)
        self._backend = self._fields.pop("backend", None)
        # validate now, so a bad decorator argument fails at import time, not at the first submit
        PlacementOptions.of(**self._plan)
        self._template = JobSpec(function=fn, **self._fields)
        functools.update_wrapper(self, fn)

    @property
    def spec(self) -> JobSpec:
        return self._template

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__meshrun_function__(*args, **kwargs)

    def options(self, **fields: Any) -> JobFunction[P, R]:
        """The same function with some job fields changed: ``train.options(gpus=4).submit(...)``."""
        merged = {**self._fields, **self._plan, **fields}
        if self._backend is not None and "backend" not in fields:
            merged["backend"] = self._backend
        return JobFunction(self.__meshrun_function__, merged)

    def spec_for(self, *args: P.args, **kwargs: P.kwargs) -> JobSpec:
        return self._template.replace(args=args, kwargs=kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Run ``fn(*args, **kwargs)`` as a job; returns a :class:`meshrun.Job` at once."""
        from ._scheduler import submit

        return submit(self.spec_for(*args, **kwargs), backend=self._backend, **self._plan)

    def map(self, *iterables: Iterable[Any], **kwargs: Any) -> list[Job[R]]:
        """One job per item (``zip`` of the iterables, like built-in ``map``); a native job array where the
        backend has one. Keyword arguments are passed to every call."""
        from ._scheduler import submit_many

        specs = [self.spec_for(*args, **kwargs) for args in zip(*iterables)]
        if not specs:
            return []
        return submit_many(specs, backend=self._backend, **self._plan)

    def __repr__(self) -> str:
        return f"<meshrun.job {getattr(self, '__qualname__', '?')} [{self._template.resources.describe()}]>"

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self.__call__, obj)

    def __reduce__(self) -> Any:
        return (_rebuild, (self.__meshrun_function__, {**self._fields, **self._plan,
                                                         **({"backend": self._backend} if self._backend else {})}))


def _rebuild(fn: Callable[..., Any], fields: dict[str, Any]) -> JobFunction[..., Any]:
    return JobFunction(fn, fields)


@overload
def job(fn: Callable[P, R], /) -> JobFunction[P, R]: ...


@overload
def job(**fields: Any) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...


def job(fn: Any = None, /, **fields: Any) -> Any:
    """Decorate a function with the job it should become: ``@meshrun.job(gpus=2, memory="16GiB")``.

    Keywords are :class:`meshrun.JobSpec` fields (plus ``backend=`` and placement options)."""
    for bad in ("function", "command", "args", "kwargs"):
        if bad in fields:
            raise SpecError(bad, "is set by the decorator itself; pass the other job fields only")
    if fn is not None:
        if not callable(fn):
            raise SpecError("function", f"@meshrun.job decorates a function, got {type(fn).__name__}")
        return JobFunction(fn, fields)

    def deco(f: Callable[P, R]) -> JobFunction[P, R]:
        if not callable(f):
            raise SpecError("function", f"@meshrun.job decorates a function, got {type(f).__name__}")
        return JobFunction(f, fields)

    return deco
