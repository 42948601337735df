"""`edge-gateway discover opcua`: the endpoints of a server and its variables, as `tags:` YAML.

The session is opened exactly as the OPC UA driver opens it (its config model and client set-up,
so the security and user options mean the same), then the address space is browsed breadth
first from `--root` along hierarchical references (properties left out), at most `--max-nodes`
nodes, `--depth` levels and `--time-limit` seconds. Every variable becomes a tag named after its
browse path below the root; an array node is suggested as a waveform tag.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from asyncua import Client, ua
from pydantic import ValidationError

from drivers.opcua import OpcUaConfig, OpcUaDriver
from drivers.discovery import Bounds, DiscoverError, Names, Progress, scalar, tag_name
from gateway.health import DeviceHealth

BATCH = 100  # nodes per Browse or Read request
# What the driver makes of a node's value (drivers.opcua: _plain, to_block).
_PLAIN = {"Boolean", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double",
          "String", "DateTime", "LocalizedText"}
_WAVEFORM = {"Float", "Double", "Int16", "Int32"}
_LOST = (OSError, asyncio.TimeoutError, ConnectionError)


@dataclass
class Variable:
    node: str
    path: list[str]
    datatype: str = "?"
    dims: list[int] | None = None  # None: a scalar
    status: str = "Good"


def _config(args: argparse.Namespace) -> OpcUaConfig:
    """The driver's own config model, with the options given: the same checks, the same meaning."""
    security = {"policy": args.policy, "mode": args.mode, "certificate": args.certificate,
                "private_key": args.private_key, "private_key_password_file": args.private_key_password_file,
                "server_certificate": args.server_certificate}
    try:
        return OpcUaConfig(name=args.name or "discover", driver="opcua", endpoint=args.endpoint, timeout=args.timeout,
                           security={k: v for k, v in security.items() if v is not None},
                           username=args.username, password_file=args.password_file,
                           application_uri=args.application_uri, tags=[{"name": "root", "node": args.root}])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != 0)
        raise DiscoverError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


async def _endpoints(endpoint: str, timeout: float) -> list[str]:
    """The endpoints offered, as comment lines (asked on a channel without security, as
    discovery is meant to be)."""
    client = Client(endpoint, timeout=timeout)
    try:
        found = await asyncio.wait_for(client.connect_and_get_server_endpoints(), timeout * 2)
    except _LOST as exc:
        raise DiscoverError(f"cannot reach {endpoint}: {type(exc).__name__}: {exc}") from None
    except ua.UaError as exc:
        return [f"#   (the server did not list its endpoints: {exc})"]
    lines = []
    for ep in found:
        policy = (ep.SecurityPolicyUri or "").rsplit("#", 1)[-1] or "None"
        mode = ep.SecurityMode.name.rstrip("_")
        tokens = ", ".join(t.TokenType.name for t in ep.UserIdentityTokens or [])
        lines.append(f"#   {ep.EndpointUrl}  policy {policy}, mode {mode}; users: {tokens or 'none listed'}")
    return lines


async def _browse(client: Client, nodes: list[ua.NodeId]) -> list[list[ua.ReferenceDescription]]:
    """Hierarchical forward references to objects and variables of each node, properties left out."""
    params = ua.BrowseParameters()
    params.View = ua.ViewDescription()
    params.RequestedMaxReferencesPerNode = 0
    for node in nodes:
        desc = ua.BrowseDescription()
        desc.NodeId = node
        desc.BrowseDirection = ua.BrowseDirection.Forward
        desc.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        desc.IncludeSubtypes = True
        desc.NodeClassMask = ua.NodeClass.Object | ua.NodeClass.Variable
        desc.ResultMask = ua.BrowseResultMask.All
        params.NodesToBrowse.append(desc)
    results = await client.uaclient.browse(params)
    out = []
    for node, result in zip(nodes, results):
        if not result.StatusCode.is_good():
            raise DiscoverError(f"cannot browse {node.to_string()}: {result.StatusCode.name}")
        refs = list(result.References)
        point = result.ContinuationPoint
        while point:
            more = await client.uaclient.browse_next(ua.BrowseNextParameters(ContinuationPoints=[point]))
            refs.extend(more[0].References)
            point = more[0].ContinuationPoint
        out.append([r for r in refs if r.ReferenceTypeId != ua.NodeId(ua.ObjectIds.HasProperty)])
    return out


def _type_name(datatype: object) -> str:
    if isinstance(datatype, ua.NodeId):
        if datatype.NamespaceIndex == 0 and isinstance(datatype.Identifier, int):
            return ua.ObjectIdNames.get(datatype.Identifier, datatype.to_string())
        return datatype.to_string()
    return "?"


async def _describe(client: Client, found: list[Variable]) -> None:
    """Data type, array dimensions (from the value: servers often leave ArrayDimensions empty)
    and the status of the value now, of each variable."""
    for i in range(0, len(found), BATCH):
        chunk = found[i:i + BATCH]
        nodes = [client.get_node(v.node) for v in chunk]
        types = await client.read_attributes(nodes, ua.AttributeIds.DataType)
        ranks = await client.read_attributes(nodes, ua.AttributeIds.ValueRank)
        values = await client.read_attributes(nodes, ua.AttributeIds.Value)
        for var, dtype, rank, dv in zip(chunk, types, ranks, values):
            var.datatype = _type_name(dtype.Value.Value if dtype.Value is not None else None)
            status = dv.StatusCode if dv.StatusCode is not None else ua.StatusCode()
            var.status = status.name
            variant = dv.Value
            if variant is not None and variant.Value is not None:
                if variant.is_array:
                    var.dims = list(variant.Dimensions or [len(variant.Value)])
            elif rank.Value is not None and isinstance(rank.Value.Value, int) and rank.Value.Value >= 1:
                var.dims = [0] * rank.Value.Value  # no value now: the declared rank, sizes unknown


async def _walk(client: Client, root: ua.NodeId, depth: int, bounds: Bounds, progress: Progress) -> list[Variable]:
    skip = {ua.NodeId(ua.ObjectIds.Server)}  # the server's own diagnostics: thousands of nodes
    seen = {root}
    level: list[tuple[ua.NodeId, list[str]]] = [(root, [])]
    found: list[Variable] = []
    for _ in range(depth):
        below: list[tuple[ua.NodeId, list[str]]] = []
        for i in range(0, len(level), BATCH):
            chunk = level[i:i + BATCH]
            for (_, path), refs in zip(chunk, await _browse(client, [n for n, _ in chunk])):
                for ref in refs:
                    node = ref.NodeId
                    node = ua.NodeId(node.Identifier, node.NamespaceIndex, node.NodeIdType)
                    if node in seen or node in skip:
                        continue
                    if not bounds.take():
                        return found
                    seen.add(node)
                    child = path + [ref.BrowseName.Name or ref.DisplayName.Text or "node"]
                    if ref.NodeClass == ua.NodeClass.Variable:
                        found.append(Variable(node.to_string(), child))
                    below.append((node, child))
            progress.update(bounds.count, bounds.max_count, f"nodes, {len(found)} variables")
        if not below:
            break
        level = below
    return found


def _tag_lines(var: Variable, name: str) -> list[str]:
    lines = [f"      - name: {scalar(name)}"]  # quoted: a name like 1_000 or on is not a number or a bool
    where = var.datatype if var.dims is None else f"{var.datatype} array {'x'.join(str(d) if d else '?' for d in var.dims)}"
    notes = [where]
    if var.status != "Good":
        notes.append(f"value now {var.status}")
    if var.dims is None and var.datatype not in _PLAIN:
        notes.append("sent as text")
    lines.append(f"        node: {scalar(var.node)}  # {', '.join(notes)}")
    if var.dims is not None:
        if len(var.dims) > 1:
            lines.append("        # a multi-dimensional array: waveform tags take 1-D arrays only; sent as text")
        elif var.datatype in _WAVEFORM:
            lines.append("        # an array: a waveform tag once it has its sample rate (Hz), or sample_rate_node")
            lines.append("        # sample_rate: <fill in>")
        else:
            lines.append(f"        # a {var.datatype} array: waveform tags take Float, Double, Int16 or Int32; sent as text")
    return lines


def _device_lines(cfg: OpcUaConfig, name: str) -> list[str]:
    lines = [f"  - name: {scalar(name)}", "    driver: opcua", f"    endpoint: {scalar(cfg.endpoint)}"]
    sec = cfg.security
    if sec.policy != "None":
        lines.append(f"    security:\n      policy: {sec.policy}\n      mode: {sec.mode}")
        for key in ("certificate", "private_key", "private_key_password_file", "server_certificate"):
            if getattr(sec, key) is not None:
                lines.append(f"      {key}: {scalar(str(getattr(sec, key)))}")
    if cfg.username is not None:
        lines.append(f"    username: {scalar(cfg.username)}")
    if cfg.password_file is not None:
        lines.append(f"    password_file: {scalar(str(cfg.password_file))}")
    if cfg.application_uri is not None:
        lines.append(f"    application_uri: {scalar(cfg.application_uri)}")
    lines.append("    mode: subscribe")
    return lines


async def discover(args: argparse.Namespace, progress: Progress) -> str:
    cfg = _config(args)
    root = ua.NodeId.from_string(args.root)
    bounds = Bounds(args.max_nodes, args.time_limit, "nodes")
    endpoints = await _endpoints(cfg.endpoint, cfg.timeout)
    client = await OpcUaDriver(cfg, DeviceHealth(cfg.name))._client()
    try:
        try:
            await asyncio.wait_for(client.connect(), max(cfg.timeout * 2, 5.0))
        except (*_LOST, ua.UaError) as exc:
            raise DiscoverError(f"cannot open a session on {cfg.endpoint}: {type(exc).__name__}: {exc}") from None
        try:
            found = await _walk(client, root, args.depth, bounds, progress)
            await _describe(client, found)
        except (*_LOST, ua.UaError) as exc:
            raise DiscoverError(f"browsing {cfg.endpoint} failed: {type(exc).__name__}: {exc}") from None
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), 2.0)
        except Exception:  # noqa: BLE001 - the session may be gone already; nothing to tidy up
            pass
    if not found:
        raise DiscoverError(f"no variable below {args.root} (depth {args.depth})"
                            + (f"; stopped: {bounds.exhausted}" if bounds.exhausted else ""))
    out = [f"# edge-gateway discover opcua {cfg.endpoint}: {len(found)} variables in {bounds.count} nodes below "
           f"{args.root}, {bounds.elapsed:.1f} s"]
    if bounds.exhausted:
        out.append(f"# INCOMPLETE: stopped because {bounds.exhausted} (see --max-nodes, --time-limit, --depth)")
    out += ["# endpoints offered:", *endpoints, "devices:"]
    out += _device_lines(cfg, args.name or tag_name(f"opcua_{client.server_url.hostname}"))
    out.append("    tags:")
    names = Names()
    for var in found:
        out += _tag_lines(var, names(var.path))
    return "\n".join(out) + "\n"
