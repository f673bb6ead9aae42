"""The run-time port contract: what a node's forward returns is checked against its declared ports.

Validation checks the declared sizes across edges; this checks the tensors themselves, at the
producing node, on every forward (shape comparisons only): ``run()`` returns a dict, every
output that feeds an edge is a tensor with the port's number of axes, the batch size of the
node's inputs, the token count its builder's ``output_tokens()`` gives for the inputs'
lengths, and the port's feature size; every graph output is a tensor. A mismatch raises
:class:`PortContractError`, which the schedule reports as the node's forward failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.kinds.builder import Ports
from mimo_builder._internal.runtime.items import Items


class PortContractError(MimoError, ValueError):
    """A node's forward returned something its declared ports do not allow."""


def check_outputs(builder, ports: Ports, inputs: Mapping[str, torch.Tensor], outputs,
                  fed: Iterable[str], returned: Iterable[str]) -> None:
    """Raise :class:`PortContractError` unless ``outputs`` keeps the contract of ``ports`` for
    these ``inputs``: ``fed`` ports (feeding edges) in full, ``returned`` ones (graph outputs)
    as tensors where present."""
    if not isinstance(outputs, Mapping):
        raise PortContractError(f"run() returned a {type(outputs).__name__}; it must return a dict of "
                                f"output tensors by port name ({', '.join(sorted(ports.outputs))})")
    fed, returned = set(fed), set(returned)
    for port in sorted(fed | returned):
        if port not in outputs:
            if port in fed:  # a graph output may exist in one mode only (e.g. 'correct' in eval mode)
                raise PortContractError(f"run() returned {sorted(outputs)} without output '{port}', "
                                        "which feeds another node")
            continue
        value = outputs[port]
        if not torch.is_tensor(value):
            hint = " (a module returning (output, extra)? return the output alone)" if isinstance(value, tuple) else ""
            raise PortContractError(f"output '{port}' is a {type(value).__name__}, not a tensor{hint}")
    expected_tokens = _output_tokens(builder, ports, inputs)
    rows = _rows(ports, inputs)
    for port in sorted(fed):
        declared = _declared(ports.outputs[port], rows, expected_tokens.get(port))
        shape = list(outputs[port].shape)
        if len(shape) != len(declared) or any(want is not None and got != want
                                               for got, (_, want) in zip(shape, declared)):
            described = ", ".join(f"{dim} {'?' if want is None else want}" for dim, want in declared)
            raise PortContractError(f"output '{port}' has shape {shape} but its port declares [{described}]")


def _declared(port, rows: int | None, tokens: int | None) -> list[tuple[str, int | None]]:
    """(axis name, size or None where free) for each axis of ``port``."""
    out = []
    for i, dim in enumerate(port.dims):
        size = port.shape[i] if port.shape is not None and i < len(port.shape) else None
        if dim == "batch":
            size = rows
        elif dim == "tokens" and tokens is not None:
            size = tokens
        elif i == len(port.dims) - 1 and port.features is not None:
            size = port.features
        out.append((dim, size))
    return out


def _rows(ports: Ports, inputs: Mapping[str, torch.Tensor]) -> int | None:
    """The batch size of the node's batch-first inputs (None without any)."""
    for name, value in inputs.items():
        port = ports.inputs.get(name)
        if port is not None and isinstance(value, Items):
            return len(value)
        if port is not None and port.dims[:1] == ("batch",) and torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    return None


def _output_tokens(builder, ports: Ports, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What ``output_tokens()`` says for these inputs' lengths ({} where it says nothing); with
    ragged items, the longest sample's tokens: its items' ``item_tokens`` added up."""
    ragged = {name: value for name, value in inputs.items() if isinstance(value, Items)}
    if ragged:
        return _ragged_tokens(builder, ragged)
    lengths = {name: value.shape[1] for name, value in inputs.items()
               if name in ports.inputs and torch.is_tensor(value) and value.dim() > 1}
    try:
        counts = builder.output_tokens(lengths)
    except Exception:  # noqa: BLE001 - a builder without output_tokens(): no token count to check
        return {}
    return {port: count for port, count in (counts or {}).items() if isinstance(count, int)}


def _ragged_tokens(builder, ragged: Mapping[str, Items]) -> dict[str, int]:
    longest: dict[str, int] = {}
    for name, items in ragged.items():
        for values in items.samples:
            total: dict[str, int] = {}
            for item in values:
                for port, count in builder.item_tokens(name, tuple(item.shape)).items():
                    total[port] = total.get(port, 0) + count
            for port in builder.ports().outputs:
                longest[port] = max(longest.get(port, 0), total.get(port, 0))
    return longest


class PortContract:
    """The ports each node of a validated graph must fill: :meth:`check` after its last stage."""

    def __init__(self, valid):
        self.valid = valid
        self.fed = {n: {e.src_port for e in valid.edges if e.src == n} for n in valid.order}
        self.returned = {n: {port for node, port in valid.outputs if node == n} for n in valid.order}

    def announce(self, requested: Iterable[tuple[str, str]] = ()) -> None:
        """Tell each node's builder which of its outputs the graph (and ``requested``) reads."""
        extra: dict[str, set[str]] = {}
        for node, port in requested:
            extra.setdefault(node, set()).add(port)
        for node in self.valid.order:
            used = self.fed[node] | self.returned[node] | extra.get(node, set())
            self.valid.builders[node].outputs_in_use = frozenset(used)

    def check(self, node: str, inputs: Mapping[str, torch.Tensor], outputs) -> None:
        """Raise :class:`PortContractError` where ``outputs`` of ``node`` break its ports."""
        check_outputs(self.valid.builders[node], self.valid.ports(node), inputs, outputs,
                      self.fed[node], self.returned[node])
