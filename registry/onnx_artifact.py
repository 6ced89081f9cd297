"""ONNX exports as registry versions (kind ``onnx``): folders checked by their manifest and the ONNX checker.

A version of kind ``onnx`` is a folder written by :func:`weightlab.onnx_export.export_onnx` (``manifest.json``,
each graph with its external-data file, tokenizer and scheduler). It holds no residual, so it is validated here
instead of by ``weightlab.load``: the manifest is a weightlab ONNX manifest; every graph it lists is in the folder
with the sha256 the manifest records and passes ``onnx.checker`` (nodes, opset, types); every initializer lies
inside the graph's own external-data file (a plain file name next to the graph). External data is never loaded.

Example:
    >>> describe_onnx(Path("export/")).family   # doctest: +SKIP
    'sd15'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightlab.errors import FileFormatError, RegistryError, WeightlabError
from weightlab.files import file_sha256
from weightlab.onnx_manifest import MANIFEST, Graph, OnnxManifest
from weightlab.registry.checkouts import check_relpath

_FIX = "Fix: register the folder `weightlab export onnx` wrote, unchanged (re-export it if it was edited)."


@dataclass(frozen=True)
class OnnxSummary:
    """What the registry records about an ONNX export."""

    family: str
    dtypes: list[str]
    n_params: int
    n_graphs: int
    config: dict[str, Any]


def is_onnx_export(path: Path) -> bool:
    """A folder with a top-level ``manifest.json`` (an ONNX export; :func:`describe_onnx` checks it)."""
    return path.is_dir() and (path / MANIFEST).is_file()


def check_residual(info) -> None:
    """Raise RegistryError if the version (a ``VersionInfo``) is an ONNX export, which does not load as a residual."""
    if info.kind == "onnx":
        raise RegistryError(f"{info.ref} is an ONNX export, not a residual to load. Fix: use path({info.ref!r}) with "
                            "weightlab.OnnxVideoPipeline.")


def _bad(folder: Path, problem: str) -> FileFormatError:
    return FileFormatError(f"{folder.name or folder}: not a valid weightlab ONNX export: {problem}. {_FIX}")


def _manifest(folder: Path) -> OnnxManifest:
    """The folder's manifest (named by the folder's own name: a server's staging path is nobody's business)."""
    try:
        text = (folder / MANIFEST).read_bytes()
    except OSError as e:
        raise _bad(folder, f"{MANIFEST} is not readable ({e.strerror})") from None
    return OnnxManifest.parse(text, where=f"{folder.name}/{MANIFEST}")


def _file(folder: Path, entry: Graph, key: str, graph: str) -> Path:
    rel = getattr(entry, key)
    try:
        path = folder / check_relpath(rel)
    except WeightlabError:
        raise _bad(folder, f"graph {graph!r}: `{key}` {rel!r} is not a relative path inside the folder") from None
    if not path.is_file():
        raise _bad(folder, f"graph {graph!r}: {rel} is missing")
    return path


def _check_external_data(folder: Path, name: str, proto, data: Path) -> None:
    """Every external initializer points into ``data`` (by its plain name), within its size, with its own length."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    size = data.stat().st_size
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        try:
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            expected = tensor_dtype_to_np_dtype(init.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise _bad(folder, f"graph {name!r}: initializer {init.name!r} has no valid offset/length/type") from None
        for d in init.dims:
            expected *= d
        if ext.get("location") != data.name:
            raise _bad(folder, f"graph {name!r}: initializer {init.name!r} points at {ext.get('location')!r}, not at "
                               f"its external-data file {data.name!r}")
        if offset < 0 or length != expected or offset + length > size:
            raise _bad(folder, f"graph {name!r}: initializer {init.name!r} (offset {offset}, length {length}, "
                               f"{expected} bytes by shape) does not fit in {data.name} ({size} bytes)")


def _check_graph(folder: Path, name: str, proto) -> None:
    """``onnx.checker`` on the graph with its initializers as typed inputs (their bytes were checked above)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    known = {i.name for i in graph.input}
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer if t.name not in known)
    del graph.initializer[:]
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise _bad(folder, f"graph {name!r} fails the ONNX checker: {str(e).splitlines()[0]}") from None


def describe_onnx(folder: Path) -> OnnxSummary:
    """Validate an ONNX export folder and summarise it (family from the UNet's initializer names).

    Raises:
        FileFormatError: a rule above is broken (the message names the graph and the file).
        FamilyMismatchError: the UNet's weights fit no known family.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.helper import tensor_dtype_to_np_dtype

    from weightlab.families import detect_family

    manifest = _manifest(folder)
    dtypes, n_params, graphs, unet_keys = set(), 0, {}, {}
    for name, entry in manifest.models.items():
        graph, data = _file(folder, entry, "graph", name), _file(folder, entry, "data", name)
        if data.parent != graph.parent:
            raise _bad(folder, f"graph {name!r}: its external data must sit next to it")
        if file_sha256(graph) != entry.graph_sha256:
            raise _bad(folder, f"graph {name!r}: {entry.graph} does not have the sha256 the manifest records")
        try:
            proto = onnx.load(str(graph), load_external_data=False)
        except (DecodeError, OSError, ValueError) as e:
            raise _bad(folder, f"graph {name!r}: {entry.graph} is not an ONNX model ({type(e).__name__})") from None
        _check_external_data(folder, name, proto, data)
        _check_graph(folder, name, proto)
        constants = set(entry.constants)
        for init in proto.graph.initializer:
            dtypes.add(tensor_dtype_to_np_dtype(init.data_type).name)
            count = 1
            for d in init.dims:
                count *= d
            n_params += count
            if name == "unet" and init.name not in constants:
                unet_keys[init.name] = len(init.dims)
        graphs[name] = {"inputs": entry.inputs, "outputs": entry.outputs}
    family = detect_family(unet_keys, what=f"{folder.name}: the ONNX UNet").name
    config = {"dtype": manifest.dtype, "opset": manifest.opset, "pipeline": manifest.pipeline.model_dump(mode="json"),
              "graphs": graphs}
    return OnnxSummary(family=family, dtypes=sorted(dtypes), n_params=n_params, n_graphs=len(graphs), config=config)
