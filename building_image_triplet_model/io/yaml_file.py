"""One reader for every command that reads a config file (the processor, the status command, the VM's
config step): at most MAX_CONFIG_BYTES of UTF-8 text, parsed by yaml's safe loader, with the document's size
counted as its aliases expand (MAX_YAML_NODES). A few hundred bytes of nested aliases (a "billion laughs")
would otherwise become billions of nodes wherever the value is walked or printed. A message shows a value
cut short (short()), never the whole of it.
"""

from __future__ import annotations

import os
import reprlib
from typing import Any

import yaml

from building_image_triplet_model.errors import ConfigError

MAX_CONFIG_BYTES = 256 * 1024  # a real config is a few kB
MAX_YAML_NODES = 10_000  # nodes of the document with every alias expanded; a real config has ~100

_SHORT = reprlib.Repr()  # Python 3.11's takes no arguments
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = 4


def short(value: Any) -> str:
    """A value as a message shows it: its repr, cut short."""
    return _SHORT.repr(value)


# data: keys that the trainer (GeoTripletDataModule) reads and this processor does not.


def read_text(path: str | os.PathLike[str]) -> str:
    """A config file's text: UTF-8, at most MAX_CONFIG_BYTES (ConfigError naming the file otherwise)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})") from None


def _expanded_nodes(root: yaml.Node, where: str) -> int:
    """The document's node count with every alias expanded; ConfigError past MAX_YAML_NODES or on an alias
    that contains itself. Each node is counted once (memoised), so this takes time linear in the file."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if children_done:
            open_.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise ConfigError(
                    f"{where}: its aliases expand to more than {MAX_YAML_NODES} values: refused "
                    "(a config needs a few hundred)"
                )
            continue
        if id(node) in open_:
            raise ConfigError(f"{where}: an alias that contains itself: refused")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document, by yaml's safe loader, bounded in size and in what its aliases expand to."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ConfigError(f"{where}: not valid YAML: {said[:300] or type(exc).__name__}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply: not a config file") from None
    finally:
        loader.dispose()
