"""`@interact` in a cell, as SageMathCell's pages speak it.

A decorated function announces its controls as a `display_data` of type `application/sage-interact`
(`new_interact_id`, `controls`, `layout`), runs once with the defaults, and stays registered in the kernel.
When a control moves, the page sends a `sagenb.interact.update_interact` request (`interact_id`, `values`,
`update_last`) on the shell channel; the kernel runs the function again with the new values and answers with
a `sagenb.interact.update_interact_reply`. Everything the function outputs carries `interact_id` in its
metadata, and each run begins with an `application/sage-clear`, so the page keeps the interact's output
apart from the cell's and replaces it on every change.

The same protocol serves the Sage kernel and the plain Python one (no ipywidgets: upstream's pages do not
speak the widget protocol, and a Python cell on upstream runs in the Sage kernel, where these names exist).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from numbers import Integral, Real
from typing import Any

INTERACT_TYPE = "application/sage-interact"
CLEAR_TYPE = "application/sage-clear"
UPDATE_REQUEST = "sagenb.interact.update_interact"
UPDATE_REPLY = "sagenb.interact.update_interact_reply"
OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error", "clear_output"})
CONTINUOUS_STEPS = 250  # a continuous slider without a step moves in this many steps, as upstream's does


class InteractError(ValueError):
    """A control that cannot be built from what the cell gave, or a value from the page it cannot take."""


def plain_number(value: Any) -> int | float:
    """A Python int or float for JSON (Sage's Integer and RealNumber are numbers.Integral/Real)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InteractError(f"{value!r} is not a number")
    return int(value) if isinstance(value, Integral) else float(value)


class Control:
    control_type = ""

    def __init__(self, default: Any, label: str | None) -> None:
        self.default = default
        self.label = label

    def message(self) -> dict[str, Any]:
        raise NotImplementedError

    def value(self, sent: Any, namespace: dict[str, Any]) -> Any:
        """What the function gets for the value the page sent."""
        raise NotImplementedError

    def initial(self, namespace: dict[str, Any]) -> Any:
        return self.default


class Slider(Control):
    """A slider over numbers (start, stop, step) or over a list of values (the page sends an index)."""

    control_type = "slider"

    def __init__(
        self,
        vmin: Any = 0,
        vmax: Any = None,
        step_size: Any = None,
        default: Any = None,
        label: str | None = None,
        display_value: bool = True,
    ) -> None:
        self.values: list[Any] | None = None
        self.display_value = display_value
        if vmax is None and (isinstance(vmin, (list, tuple, range)) or inspect.isgenerator(vmin)):
            self.values = list(vmin)
            if not self.values:
                raise InteractError("a slider needs at least one value")
            index = self.values.index(default) if default in self.values else 0
            super().__init__(index, label)
            return
        start, stop = plain_number(vmin), plain_number(1 if vmax is None else vmax)
        if start == stop:
            raise InteractError(f"a slider needs two different ends, not {start} and {stop}")
        self.start, self.stop = min(start, stop), max(start, stop)
        self.step = plain_number(step_size) if step_size is not None else (self.stop - self.start) / CONTINUOUS_STEPS
        if self.step <= 0:
            raise InteractError(f"a slider's step must be positive, not {self.step}")
        self.integral = all(isinstance(end, int) for end in (self.start, self.stop, self.step))
        super().__init__(self.constrain(self.start if default is None else plain_number(default)), label)

    def constrain(self, number: float) -> int | float:
        bounded = min(max(number, self.start), self.stop)
        return round(bounded) if self.integral else float(bounded)

    def message(self) -> dict[str, Any]:
        if self.values is not None:
            return {"control_type": "slider", "subtype": "discrete", "display_value": self.display_value,
                    "default": self.default, "range": [0, len(self.values) - 1], "step": 1,
                    "values": [str(value) for value in self.values], "raw": True}  # fmt: skip
        return {"control_type": "slider", "subtype": "continuous", "display_value": self.display_value,
                "default": self.default, "range": [self.start, self.stop], "step": self.step, "raw": True}  # fmt: skip

    def value(self, sent: Any, namespace: dict[str, Any]) -> Any:
        number = plain_number(sent)
        if self.values is not None:
            return self.values[int(min(max(number, 0), len(self.values) - 1))]
        if not math.isfinite(number):
            raise InteractError(f"a slider value must be a finite number, not {number}")
        return self.constrain(number)

    def initial(self, namespace: dict[str, Any]) -> Any:
        return self.values[self.default] if self.values is not None else self.default


class InputBox(Control):
    """A text box. With a default that is not a string, what is typed is evaluated (as Sage in the Sage
    kernel), as upstream's input box does."""

    control_type = "input_box"

    def __init__(self, default: Any = "", label: str | None = None, width: int = 0, height: int = 1) -> None:
        super().__init__(default, label)
        self.evaluate = not isinstance(default, str)
        self.width, self.height = int(width), int(height)

    def message(self) -> dict[str, Any]:
        text = self.default if isinstance(self.default, str) else repr(self.default)
        return {"control_type": "input_box", "subtype": "textarea" if self.height > 1 else "input",
                "default": text, "width": self.width, "height": self.height, "evaluate": self.evaluate,
                "keypress": False}  # fmt: skip

    def value(self, sent: Any, namespace: dict[str, Any]) -> Any:
        text = str(sent)
        return evaluated(text, namespace) if self.evaluate else text


class Selector(Control):
    """A choice among values (a drop-down list or buttons); the page sends the chosen index."""

    control_type = "selector"

    def __init__(
        self,
        values: Sequence[Any],
        label: str | None = None,
        default: Any = None,
        buttons: bool = False,
    ) -> None:
        self.values = list(values)
        if not self.values:
            raise InteractError("a selector needs at least one value")
        self.labels = [str(value) for value in self.values]
        self.buttons = buttons
        super().__init__(self.values.index(default) if default in self.values else 0, label)

    def message(self) -> dict[str, Any]:
        return {"control_type": "selector", "subtype": "button" if self.buttons else "list",
                "values": len(self.values), "value_labels": self.labels, "default": self.default,
                "nrows": None, "ncols": None, "raw": True, "width": ""}  # fmt: skip

    def value(self, sent: Any, namespace: dict[str, Any]) -> Any:
        return self.values[int(min(max(plain_number(sent), 0), len(self.values) - 1))]

    def initial(self, namespace: dict[str, Any]) -> Any:
        return self.values[self.default]


class Checkbox(Control):
    control_type = "checkbox"

    def __init__(self, default: bool = True, label: str | None = None) -> None:
        super().__init__(bool(default), label)

    def message(self) -> dict[str, Any]:
        return {"control_type": "checkbox", "default": self.default, "raw": True}

    def value(self, sent: Any, namespace: dict[str, Any]) -> Any:
        if not isinstance(sent, bool):
            raise InteractError(f"a checkbox value is true or false, not {sent!r}")
        return sent


def evaluated(text: str, namespace: dict[str, Any]) -> Any:
    """What an input box's text means: Sage's reading of it where Sage is loaded, Python's otherwise."""
    preparse = namespace.get("preparse")
    source = preparse(text) if callable(preparse) else text
    return eval(source, namespace)


def control_for(default: Any) -> Control:
    """The control a parameter's default stands for, as Sage's notebook guesses it: a control as is; a
    ("label", default) pair labels what the default stands for; a bool is a checkbox; two or three numbers are a
    slider's ends (and step); a list or range is a choice; anything else is an input box."""
    if isinstance(default, Control):
        return default
    if isinstance(default, tuple) and len(default) == 2 and isinstance(default[0], str):
        control = control_for(default[1])
        control.label = default[0]
        return control
    if isinstance(default, bool):
        return Checkbox(default)
    if isinstance(default, tuple) and len(default) in (2, 3) and all(is_number(part) for part in default):
        return Slider(*default)
    if isinstance(default, (list, range)):
        return Selector(default) if isinstance(default, list) and len(default) <= 5 else Slider(default)
    return InputBox(default)


def is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class OutputTagger:
    """Puts the running interact's id in the metadata of every output the kernel sends, the streams too
    (they are sent from ipykernel's IOPub thread, so the tag is a plain attribute, not a context variable)."""

    def __init__(self, session: Any) -> None:
        self.tag: dict[str, str] = {}
        send = session.send

        @functools.wraps(send)
        def tagged_send(stream: Any, msg_or_type: Any, *args: Any, **kwargs: Any) -> Any:
            if self.tag:
                if isinstance(msg_or_type, dict):
                    if msg_or_type.get("msg_type") in OUTPUT_TYPES:
                        msg_or_type["metadata"] = {**msg_or_type.get("metadata", {}), **self.tag}
                elif msg_or_type in OUTPUT_TYPES and len(args) < 7:
                    kwargs["metadata"] = {**(kwargs.get("metadata") or {}), **self.tag}
            return send(stream, msg_or_type, *args, **kwargs)

        session.send = tagged_send

    @contextlib.contextmanager
    def tagged(self, interact_id: str) -> Iterator[None]:
        self.tag = {"interact_id": interact_id}
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # ipykernel's flush waits until the IOPub thread has sent what was written
            self.tag = {}


class Interact:
    def __init__(self, function: Callable[..., Any], controls: dict[str, Control]) -> None:
        self.interact_id = str(uuid.uuid4())
        self.function = function
        self.controls = controls
        namespace = getattr(function, "__globals__", {})
        self.state = {name: control.initial(namespace) for name, control in controls.items()}

    def announcement(self) -> dict[str, Any]:
        controls = {}
        for name, control in self.controls.items():
            message = control.message()
            message["label"] = name if control.label is None else control.label
            message["update"] = True
            controls[name] = message
        layout = [[[name, 1]] for name in self.controls] + [[["_output", 1]]]
        return {"new_interact_id": self.interact_id, "controls": controls, "layout": layout, "locations": None,
                "readonly": False}  # fmt: skip

    def take(self, values: dict[str, Any]) -> None:
        namespace = getattr(self.function, "__globals__", {})
        for name, sent in values.items():
            if name not in self.controls:
                raise InteractError(f"this interact has no control {name!r}")
            self.state[name] = self.controls[name].value(sent, namespace)


class Interacts:
    """The interacts of one kernel, and the `interact` and control names its cells see."""

    def __init__(self, kernel: Any, hooks: Any) -> None:
        self._kernel = kernel
        self._hooks = hooks
        self._registered: dict[str, Interact] = {}
        self._tagger = OutputTagger(kernel.session)

    def names(self) -> dict[str, Any]:
        return {"interact": self.interact, "slider": Slider, "input_box": InputBox, "selector": Selector,
                "checkbox": Checkbox}  # fmt: skip

    def interact(self, function: Callable[..., Any] | None = None, **options: Any) -> Any:
        """`@interact` or `@interact(controls=[(name, control), ...])`: show the function's controls and run it."""
        if function is None:
            return lambda decorated: self.interact(decorated, **options)
        unknown = set(options) - {"controls", "layout", "update", "auto_update"}
        if unknown:
            raise TypeError(f"interact() got unexpected options {sorted(unknown)}")
        controls: dict[str, Control] = {}
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                controls[name] = control_for(parameter.default)
        for name, default in options.get("controls") or []:
            controls[name] = control_for(default)
        registered = Interact(function, controls)
        self._registered[registered.interact_id] = registered
        self._hooks.display_message({INTERACT_TYPE: registered.announcement(), "text/plain": "Sage Interact"})
        self._hooks.reset_kernel_timeout(float("inf"))  # the page's changes come later
        self._run(registered, list(controls))
        return function

    def _run(self, registered: Interact, changed: list[str]) -> None:
        with self._tagger.tagged(registered.interact_id):
            self._hooks.display_message({CLEAR_TYPE: {"changed": changed}, "text/plain": ""})
            try:
                registered.function(**registered.state)
            except Exception:
                self._kernel.shell.showtraceback()

    def handle_update(self, stream: Any, ident: Any, message: dict[str, Any]) -> None:
        """The shell handler of `sagenb.interact.update_interact`."""
        content = message.get("content", {})
        reply: dict[str, Any] = {"status": "ok"}
        try:
            registered = self._registered.get(str(content.get("interact_id")))
            if registered is None:
                raise InteractError(f"no interact {content.get('interact_id')!r} in this kernel")
            values = content.get("values", {})
            if not isinstance(values, dict):
                raise InteractError("values must be an object of control names")
            registered.take(values)
            self._run(registered, list(values))
            reply["payload"] = [{"new_files": self._hooks.changed_files(".")}]
        except Exception as error:
            reply = {"status": "error", "ename": type(error).__name__, "evalue": str(error),
                     "traceback": traceback.format_exception_only(type(error), error)}  # fmt: skip
        self._kernel.session.send(stream, UPDATE_REPLY, reply, parent=message, ident=ident)


def install(kernel: Any, hooks: Any) -> None:
    interacts = Interacts(kernel, hooks)
    kernel.shell_handlers[UPDATE_REQUEST] = interacts.handle_update
    kernel.shell.user_ns.update(interacts.names())
