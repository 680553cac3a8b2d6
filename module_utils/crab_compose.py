"""Byte-preserving edits of docker compose files.

The file is never re-dumped. ruamel.yaml composes the node tree (with line, column and character offset of
every node); the planner decides what must change from the effective model (YAML merge keys resolved, several
files combined in order as `docker compose -f a -f b` does); the edits are inserted into or replaced in the text;
the result is parsed again and compared with the original so that only the allowed keys (`logging`, or
`healthcheck`/`depends_on`) differ. Anything else is an error and nothing is written.

Shared by the compose_logging and healthcheck roles. No Ansible import: pytest imports it directly, modules
import it as ansible.module_utils.crab_compose.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer, ComposerError
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

MERGE_TAG = "tag:yaml.org,2002:merge"
# Drivers that ship logs elsewhere (or nowhere): rotation options do not apply to them.
KEEP_DRIVERS = (
    "syslog",
    "gelf",
    "fluentd",
    "awslogs",
    "journald",
    "none",
    "splunk",
    "etwlogs",
    "gcplogs",
    "logentries",
)
ROTATING_DRIVERS = ("json-file", "local")
MODES = ("add", "enforce")
_SIZE_RE = re.compile(r"^[1-9][0-9]*(\.[0-9]+)?\s*([kKmMgG][bB]?|[bB])?$")
_INT_RE = re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F]+|0o[0-7]+)$")
_FLOAT_RE = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$")
_BOOL_NULL = {"true", "false", "True", "False", "TRUE", "FALSE", "null", "Null", "NULL", "~", "yes", "no", "on", "off"}


class ComposeError(Exception):
    """A compose file cannot be read or edited safely. The message names the file, the line and the fix."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = path
        self.line = line
        where = f"{path}, line {line}" if line else path
        super().__init__(f"{where}: {message}")


class AliasRef:
    """One `*alias` occurrence: the node it points to, plus where the alias itself is written."""

    def __init__(self, target, start_mark, end_mark):
        self.target = target
        self.start_mark = start_mark
        self.end_mark = end_mark


class _PositionComposer(Composer):
    """ruamel's composer, except that aliases keep their own position (AliasRef) instead of vanishing."""

    def compose_node(self, parent, index):
        if self.parser.check_event(AliasEvent):
            event = self.parser.get_event()
            if event.anchor not in self.anchors:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            return AliasRef(self.anchors[event.anchor], event.start_mark, event.end_mark)
        return super().compose_node(parent, index)


def deref(node):
    """The node an alias stands for (or the node itself)."""
    while isinstance(node, AliasRef):
        node = node.target
    return node


def _is_merge(key) -> bool:
    key = deref(key)
    return isinstance(key, ScalarNode) and (key.tag == MERGE_TAG or (key.value == "<<" and key.style is None))


def merge_sources(mapping: MappingNode) -> list[MappingNode]:
    """Maps merged into `mapping` by `<<`, in precedence order (first wins)."""
    out = []
    for key, value in mapping.value:
        if not _is_merge(key):
            continue
        value = deref(value)
        items = value.value if isinstance(value, SequenceNode) else [value]
        out.extend(deref(item) for item in items if isinstance(deref(item), MappingNode))
    return out


def own_entry(mapping, key: str):
    """(key node, value node) written directly in `mapping`, or None."""
    mapping = deref(mapping)
    if not isinstance(mapping, MappingNode):
        return None
    for knode, vnode in mapping.value:
        knode = deref(knode)
        if isinstance(knode, ScalarNode) and not _is_merge(knode) and knode.value == key:
            return knode, vnode
    return None


def lookup(mapping, key: str, _seen=None):
    """Effective (key node, value node, defining map) for `key`, following merge keys; None when absent."""
    mapping = deref(mapping)
    if not isinstance(mapping, MappingNode):
        return None
    hit = own_entry(mapping, key)
    if hit is not None:
        return hit[0], hit[1], mapping
    seen = _seen if _seen is not None else set()
    if id(mapping) in seen:
        return None
    seen.add(id(mapping))
    for source in merge_sources(mapping):
        found = lookup(source, key, seen)
        if found is not None:
            return found
    return None


def effective_keys(mapping) -> list[str]:
    """Every key of a map after merges, own keys first."""
    mapping = deref(mapping)
    keys: list[str] = []
    if not isinstance(mapping, MappingNode):
        return keys
    for knode, _ in mapping.value:
        knode = deref(knode)
        if isinstance(knode, ScalarNode) and not _is_merge(knode) and knode.value not in keys:
            keys.append(knode.value)
    for source in merge_sources(mapping):
        keys.extend(k for k in effective_keys(source) if k not in keys)
    return keys


def scalar(node) -> str | None:
    node = deref(node)
    if isinstance(node, ScalarNode):
        return node.value
    return None


def is_plain_nonstring(node) -> bool:
    """True for an unquoted scalar that YAML reads as a number, bool or null (compose wants a string)."""
    node = deref(node)
    if not isinstance(node, ScalarNode) or node.style is not None:
        return False
    v = node.value
    return bool(_INT_RE.match(v) or _FLOAT_RE.match(v) or v in _BOOL_NULL or v == "")


def to_plain(node, _depth=0):
    """Node → plain Python (strings for scalars), merges resolved. Used to describe and compare."""
    node = deref(node)
    if _depth > 100:
        return None
    if isinstance(node, ScalarNode):
        return node.value
    if isinstance(node, SequenceNode):
        return [to_plain(item, _depth + 1) for item in node.value]
    if isinstance(node, MappingNode):
        return {k: to_plain(lookup(node, k)[1], _depth + 1) for k in effective_keys(node)}
    return None


def q(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(str(value))


def render_value(value, indent: int, step: int, nl: str) -> str:
    """Block YAML for `value` placed after `key:` at column `indent - step` (starts with a line break or space)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return " {}"
        parts = []
        for k, v in value.items():
            parts.append(f"{nl}{pad}{k}:{render_value(v, indent + step, step, nl)}")
        return "".join(parts)
    if isinstance(value, list):
        if all(not isinstance(i, dict | list) for i in value):
            return " [" + ", ".join(q(i) if isinstance(i, str) else json.dumps(i) for i in value) + "]"
        return "".join(f"{nl}{pad}-{render_value(i, indent + 2, step, nl)}" for i in value)
    if isinstance(value, bool):
        return " true" if value else " false"
    if isinstance(value, int):
        return f" {value}"
    return " " + q(value)


def render_block(key: str, value, indent: int, step: int, nl: str) -> str:
    """`key: value` as complete lines at column `indent`, each ending with `nl`."""
    return f"{' ' * indent}{key}:{render_value(value, indent + step, step, nl)}{nl}"


def render_flow(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return q(value)


@dataclass
class Edit:
    """Replace text[start:end] with `text` (start == end: pure insertion)."""

    start: int
    end: int
    text: str
    why: str = ""


class ComposeFile:
    """One compose file: its text, its node tree, its services. Raises ComposeError on anything unsafe."""

    def __init__(self, path: str, text: str | None = None):
        self.path = path
        self.real_path = os.path.realpath(path)
        if text is None:
            try:
                with open(self.real_path, encoding="utf-8", newline="") as fh:
                    text = fh.read()
            except FileNotFoundError:
                raise ComposeError(path, None, "file not found; check the compose file path") from None
            except UnicodeDecodeError as exc:
                raise ComposeError(path, None, f"not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
            except OSError as exc:
                raise ComposeError(path, None, f"cannot be read ({exc.strerror}); check permissions") from None
        self.text = text
        self.nl = "\r\n" if "\r\n" in text else "\n"
        self.root = parse_nodes(text, path)
        self.services = self._services()

    def line_of(self, node) -> int:
        return deref(node).start_mark.line + 1 if not isinstance(node, AliasRef) else node.start_mark.line + 1

    def _services(self) -> dict[str, MappingNode]:
        root = self.root
        if root is None:
            raise ComposeError(self.path, None, "the file is empty; a compose file needs a `services:` map")
        if not isinstance(root, MappingNode):
            raise ComposeError(self.path, root.start_mark.line + 1, "the top level is not a map; check the file")
        hit = lookup(root, "services")
        if hit is None:
            raise ComposeError(self.path, None, "no `services:` key; this is not a compose file")
        knode, vnode, _ = hit
        svcs = deref(vnode)
        if isinstance(svcs, ScalarNode) and svcs.value in ("", "~", "null"):
            return {}
        if not isinstance(svcs, MappingNode):
            raise ComposeError(
                self.path,
                knode.start_mark.line + 1,
                "`services:` is not a map of service names to definitions; fix its indentation or value",
            )
        out: dict[str, MappingNode] = {}
        for name in effective_keys(svcs):
            _, snode, _ = lookup(svcs, name)
            sdef = deref(snode)
            if isinstance(sdef, ScalarNode) and sdef.value in ("", "~", "null"):
                raise ComposeError(
                    self.path, sdef.start_mark.line + 1, f"service {name!r} is empty; give it a definition or remove it"
                )
            if not isinstance(sdef, MappingNode):
                raise ComposeError(
                    self.path, sdef.start_mark.line + 1, f"service {name!r} is not a map; fix its definition"
                )
            out[name] = sdef
        return out

    def is_project(self) -> bool:
        """True when at least one service can run on its own (image, build or extends)."""
        if not self.services:
            return True  # nothing to do, but nothing wrong either
        return any(any(lookup(s, k) for k in ("image", "build", "extends")) for s in self.services.values())


def parse_nodes(text: str, path: str):
    """Compose the node tree; reject tabs, duplicate keys and invalid YAML with file and line."""
    yaml = YAML(typ="rt")
    yaml.Composer = _PositionComposer
    try:
        nodes = list(yaml.compose_all(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        bad = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        if "\t" in bad[: len(bad) - len(bad.lstrip(" \t"))] or (mark is not None and "\t" in bad):
            raise ComposeError(
                path, line, "a tab character is used for indentation; replace tabs with spaces"
            ) from None
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise ComposeError(path, line, f"invalid YAML ({problem}); fix the syntax there") from None
    if len(nodes) > 1:
        raise ComposeError(
            path, nodes[1].start_mark.line + 1, "more than one YAML document; a compose file holds exactly one"
        )
    root = nodes[0] if nodes else None
    _check_duplicates(root, path, set())
    return root


def _check_duplicates(node, path: str, seen: set) -> None:
    if isinstance(node, AliasRef) or node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        keys: dict[str, int] = {}
        for knode, vnode in node.value:
            k = deref(knode)
            if isinstance(k, ScalarNode) and not _is_merge(k):
                if k.value in keys:
                    raise ComposeError(
                        path,
                        k.start_mark.line + 1,
                        f"duplicate key {k.value!r} (first at line {keys[k.value]}); remove one of them",
                    )
                keys[k.value] = k.start_mark.line + 1
            _check_duplicates(vnode, path, seen)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _check_duplicates(item, path, seen)


def load_data(text: str, path: str = "<compose>"):
    """Effective data as `docker compose` sees it before interpolation (merges resolved, real types)."""
    yaml = YAML(typ="safe", pure=True)
    try:
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ComposeError(path, mark.line + 1 if mark else None, f"invalid YAML ({exc.problem})") from None


# --- text positions -------------------------------------------------------------------------------


def content_end(node, text: str) -> int:
    """Offset just after the last character that belongs to `node` (comments and blank lines excluded)."""
    if isinstance(node, AliasRef):
        return node.end_mark.index
    if isinstance(node, MappingNode):
        if node.flow_style or not node.value:
            return node.end_mark.index
        knode, vnode = node.value[-1]
        end_k = content_end(knode, text)
        empty = isinstance(vnode, ScalarNode) and vnode.value == "" and vnode.style is None
        vend = end_k if empty else content_end(vnode, text)
        return max(end_k, vend)
    if isinstance(node, SequenceNode):
        if node.flow_style or not node.value:
            return node.end_mark.index
        return content_end(node.value[-1], text)
    end = node.end_mark.index
    header = text[node.start_mark.index : text.find("\n", node.start_mark.index)]
    if node.style in ("|", ">") and "+" in header:
        return end  # keep chomping: trailing blank lines belong to the value
    if node.style in ("|", ">"):
        while end > node.start_mark.index and text[end - 1] in " \t\r\n":
            end -= 1
    return end


def line_end(text: str, pos: int) -> int:
    """Offset just after the line break of the line holding `pos` (or end of text)."""
    nl = text.find("\n", pos)
    return len(text) if nl < 0 else nl + 1


def line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def key_column(mapping: MappingNode) -> int | None:
    for knode, _ in mapping.value:
        if isinstance(knode, AliasRef):
            return knode.start_mark.column
        return knode.start_mark.column
    return None


def indent_step(cf: ComposeFile) -> int:
    """The file's indentation step, from `services:` to its first service key (2 when unknown)."""
    hit = lookup(cf.root, "services")
    if hit is not None:
        skey, svcs, _ = hit
        svcs = deref(svcs)
        if isinstance(svcs, MappingNode) and svcs.value and not svcs.flow_style:
            step = key_column(svcs) - skey.start_mark.column
            if step > 0:
                return step
    return 2


def insert_entries(cf: ComposeFile, mapping, entries: dict, why: str) -> Edit:
    """An Edit that adds `entries` (key → plain value) at the end of `mapping`, block or flow style."""
    mapping = deref(mapping)
    text = cf.text
    if mapping.flow_style or not mapping.value:
        close = mapping.end_mark.index - 1
        if text[close] != "}":
            raise ComposeError(cf.path, mapping.start_mark.line + 1, "cannot locate the end of this flow map")
        body = ", ".join(f"{k}: {render_flow(v)}" for k, v in entries.items())
        inner = text[mapping.start_mark.index : close]
        sep = "" if inner.rstrip().endswith(("{", ",")) else ", "
        if mapping.anchor and inner.strip().startswith("&"):
            inner_after_anchor = inner.split("{", 1)[1] if "{" in inner else ""
            sep = "" if not inner_after_anchor.strip() or inner_after_anchor.rstrip().endswith(",") else ", "
        return Edit(close, close, sep + body, why)
    col = key_column(mapping)
    step = indent_step(cf)
    end = content_end(mapping, text)
    pos = end if end > 0 and text[end - 1] == "\n" else line_end(text, end)
    prefix = ""
    if pos == len(text) and not text.endswith("\n"):
        prefix = cf.nl
    block = "".join(render_block(k, v, col, step, cf.nl) for k, v in entries.items())
    return Edit(pos, pos, prefix + block, why)


def replace_value(cf: ComposeFile, knode, vnode, value, why: str) -> Edit:
    """An Edit that replaces the value of `key:` (scalar in place; collections as a new block)."""
    text = cf.text
    if isinstance(vnode, AliasRef):
        start, end = vnode.start_mark.index, vnode.end_mark.index
    elif isinstance(vnode, ScalarNode) and vnode.value == "" and vnode.style is None:
        start = end = knode.end_mark.index  # `key:` with nothing after it
    else:
        node = vnode
        start = node.start_mark.index
        end = content_end(node, text)
    if not isinstance(value, dict | list) and not isinstance(vnode, AliasRef) and isinstance(deref(vnode), ScalarNode):
        if deref(vnode).anchor:
            raise ComposeError(
                cf.path,
                deref(vnode).start_mark.line + 1,
                "the value to change carries an anchor used elsewhere; change it by hand",
            )
        return Edit(start, end, render_flow(value), why)
    col = knode.start_mark.column
    step = indent_step(cf)
    kstart = knode.start_mark.index
    if text[line_start(text, kstart) : kstart].strip():
        # key not first on its line (e.g. `- key: v`): keep the flow form on the same line
        return Edit(start, end, render_flow(value), why)
    new = render_block(knode.value, value, col, step, cf.nl)
    stop = end if end > 0 and text[end - 1] == "\n" else line_end(text, end)
    return Edit(line_start(text, kstart), stop, new, why)


def apply_edits(text: str, edits: list[Edit]) -> str:
    ordered = sorted(edits, key=lambda e: (e.start, e.end))
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise ValueError(f"overlapping edits at offsets {a.start}-{a.end} and {b.start}-{b.end}")
    for e in reversed(ordered):
        text = text[: e.start] + e.text + text[e.end :]
    return text


# --- logging policy -------------------------------------------------------------------------------


@dataclass
class LoggingPolicy:
    """What every service's logging must look like."""

    max_size: str = "10m"
    max_file: str = "3"
    mode: str = "add"
    driver: str = "json-file"
    extra_options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.max_size = str(self.max_size)
        self.max_file = str(self.max_file)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}; use add or enforce")
        if self.driver not in ROTATING_DRIVERS:
            raise ValueError(f"driver {self.driver!r} does not rotate logs; use json-file or local")
        problems = validate_options(self.driver, self.options())
        if problems:
            raise ValueError(f"invalid logging limits: {'; '.join(problems)}")

    def options(self) -> dict:
        opts = {"max-size": self.max_size, "max-file": self.max_file}
        opts.update({k: str(v) for k, v in self.extra_options.items()})
        return opts


def validate_options(driver: str | None, options: dict) -> list[str]:
    """Docker's own rules for json-file/local rotation options, as readable problems (empty when valid)."""
    problems = []
    driver = driver or "json-file"
    size = options.get("max-size")
    files = options.get("max-file")
    compress = options.get("compress")
    if size is not None and not _SIZE_RE.match(str(size)):
        problems.append(f"max-size {size!r} is not a size like 10m or 512k")
    nfiles = None
    if files is not None:
        try:
            nfiles = int(str(files))
        except ValueError:
            problems.append(f"max-file {files!r} is not a whole number")
        else:
            if nfiles < 1:
                problems.append(f"max-file {files!r} must be at least 1")
    if compress is not None and str(compress) not in ("true", "false"):
        problems.append(f'compress {compress!r} must be the string "true" or "false"')
    if driver == "json-file" and nfiles is not None and nfiles > 1 and size is None:
        problems.append("max-file without max-size does not rotate; set max-size too")
    effective_compress = str(compress) if compress is not None else ("true" if driver == "local" else "false")
    if nfiles == 1 and effective_compress == "true":
        problems.append(f"{driver} with compress on needs max-file of at least 2")
    return problems


@dataclass
class ServiceChange:
    service: str
    path: str
    action: str
    before: dict | None
    after: dict | None


@dataclass
class FileResult:
    path: str
    real_path: str
    before: str
    after: str
    edits: list = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass
class PlanResult:
    files: list
    changed_services: list
    skipped: list
    unchanged: list

    @property
    def changed(self) -> bool:
        return any(f.changed for f in self.files)

    def diff(self) -> list[dict]:
        return [
            {"before_header": f.path, "after_header": f.path, "before": f.before, "after": f.after}
            for f in self.files
            if f.changed
        ]


def _combined_logging(defs):
    """compose's rule across files: later logging overrides; options merge when the driver is the same."""
    combined = None
    for item in defs:
        plain = item if isinstance(item, dict) else to_plain(item[2])
        if not isinstance(plain, dict):
            plain = {}
        if combined is None:
            combined = copy.deepcopy(plain)
            continue
        if plain.get("driver") and combined.get("driver") and plain["driver"] != combined["driver"]:
            combined = copy.deepcopy(plain)
        else:
            if plain.get("driver"):
                combined["driver"] = plain["driver"]
            if isinstance(plain.get("options"), dict):
                merged = dict(combined.get("options") or {})
                merged.update(plain["options"])
                combined["options"] = merged
    return combined


class ComposeProject:
    """The files of one compose project, in `-f` order. Plans and applies edits to all of them together."""

    def __init__(self, paths: list[str], texts: dict | None = None):
        if not paths:
            raise ValueError("no compose file given; pass at least one path")
        texts = texts or {}
        self.files = [ComposeFile(p, texts.get(p)) for p in paths]
        reals = [f.real_path for f in self.files]
        if len(set(reals)) != len(reals):
            raise ComposeError(paths[0], None, "the same file is listed twice (maybe through a symlink)")
        if not self.files[0].is_project():
            raise ComposeError(
                paths[0],
                None,
                "no service has image, build or extends: this is an override or extends fragment, not a project; "
                "list it after the main compose file",
            )

    def service_names(self) -> list[str]:
        names: list[str] = []
        for f in self.files:
            names.extend(n for n in f.services if n not in names)
        return names

    def definitions(self, name: str):
        return [(f, f.services[name]) for f in self.files if name in f.services]

    # -- logging --

    def plan_logging(self, policy: LoggingPolicy) -> PlanResult:
        """Edit until every service complies; each pass re-parses so merge-key inheritance is seen."""
        changed: dict[str, ServiceChange] = {}
        originals = {f.path: f.text for f in self.files}
        first = {name: self.effective_logging(name) for name in self.service_names()}
        all_edits: dict[str, list] = {f.path: [] for f in self.files}
        skipped: list[dict] = []
        for _ in range(20):
            edits, changes, skipped, blocked = self._logging_pass(policy)
            if not edits:
                break
            for f in self.files:
                mine = [e for e in edits if e[0] is f]
                if mine:
                    new = apply_edits(f.text, [e[1] for e in mine])
                    all_edits[f.path].extend(e[1] for e in mine)
                    self._reload(f, new)
            for ch in changes:
                changed.setdefault(ch.service, ch)
            if not blocked and not edits:
                break
        else:
            raise ComposeError(self.files[0].path, None, "logging edits did not converge; report this file")
        # final state per service, validated before anything is written
        for name in self.service_names():
            defs = self._logging_defs(name)
            combined = self.effective_logging(name) or {}
            driver = combined.get("driver")
            if driver in KEEP_DRIVERS:
                continue
            problems = validate_options(driver, combined.get("options") or {})
            if problems:
                f = defs[-1][0] if defs else self._home(name)[0]
                line = defs[-1][1][0].start_mark.line + 1 if defs else None
                raise ComposeError(
                    f.path, line, f"service {name!r} logging is invalid: {'; '.join(problems)}; fix the values"
                )
        changed = {}
        for name in self.service_names():
            now = self.effective_logging(name)
            if now != first.get(name):
                home = self._logging_defs(name)
                path = home[-1][0].path if home else self._home(name)[0].path
                changed[name] = ServiceChange(
                    name, path, "insert" if first.get(name) is None else "update", first.get(name), now
                )
        results = [FileResult(f.path, f.real_path, originals[f.path], f.text, all_edits[f.path]) for f in self.files]
        self._verify_only(results, {"logging"})
        unchanged = [n for n in self.service_names() if n not in changed and n not in {s["service"] for s in skipped}]
        return PlanResult(results, list(changed.values()), skipped, unchanged)

    def _reload(self, f: ComposeFile, new_text: str) -> None:
        try:
            fresh = ComposeFile(f.path, new_text)
        except ComposeError as exc:
            raise ComposeError(f.path, exc.line, f"the edit produced invalid YAML ({exc}); report this file") from None
        f.text, f.root, f.services = fresh.text, fresh.root, fresh.services

    def _extends_chain(self, name: str) -> list[dict]:
        """Logging inherited through `extends` (same file or another file), base first; never edited here."""
        for f, svc in reversed(self.definitions(name)):
            if lookup(svc, "extends") is not None:
                return self._extends_logging(f, svc, name, 0)
        return []

    def _extends_target(self, f: ComposeFile, svc, name: str):
        hit = lookup(svc, "extends")
        if hit is None:
            return None
        ext = to_plain(hit[1])
        target, other = (ext, None) if isinstance(ext, str) else (ext.get("service"), ext.get("file"))
        line = hit[0].start_mark.line + 1
        if not target:
            raise ComposeError(f.path, line, f"service {name!r}: extends names no service; add `service:`")
        tf = f
        if other:
            path = os.path.join(os.path.dirname(f.real_path), other)
            cache = self.__dict__.setdefault("_extends_files", {})
            if path not in cache:
                try:
                    cache[path] = ComposeFile(path)
                except ComposeError as exc:
                    raise ComposeError(f.path, line, f"service {name!r} extends {other}: {exc}") from None
            tf = cache[path]
        if target not in tf.services:
            raise ComposeError(f.path, line, f"service {name!r} extends {target!r}, which {tf.path} does not define")
        return tf, tf.services[target], target

    def _extends_logging(self, f: ComposeFile, svc, name: str, depth: int) -> list[dict]:
        if depth > 10:
            raise ComposeError(f.path, None, f"service {name!r}: extends chain deeper than 10 (a loop?)")
        found = self._extends_target(f, svc, name)
        if found is None:
            return []
        tf, tsvc, tname = found
        chain = self._extends_logging(tf, tsvc, tname, depth + 1)
        hit = lookup(tsvc, "logging")
        if hit is not None and isinstance(to_plain(hit[1]), dict):
            chain.append(to_plain(hit[1]))
        return chain

    def effective_logging(self, name: str):
        return _combined_logging(self._extends_chain(name) + self._logging_defs(name))

    def _logging_defs(self, name: str):
        out = []
        for f, svc in self.definitions(name):
            hit = lookup(svc, "logging")
            if hit is not None:
                out.append((f, hit, deref(hit[1])))
        return out

    def _logging_pass(self, policy: LoggingPolicy):
        edits: list[tuple] = []
        changes: list[ServiceChange] = []
        skipped: list[dict] = []
        planned: list[tuple] = []
        want = policy.options()
        for name in self.service_names():
            defs = self._logging_defs(name)
            combined = self.effective_logging(name)
            driver = (combined or {}).get("driver")
            if driver in KEEP_DRIVERS and policy.mode == "add":
                skipped.append({"service": name, "driver": driver, "reason": "remote or journald driver kept"})
                continue
            unknown = driver is not None and driver not in ROTATING_DRIVERS and driver not in KEEP_DRIVERS
            if unknown and policy.mode == "add":
                skipped.append({"service": name, "driver": driver, "reason": "unknown driver kept"})
                continue
            if not defs:
                f, svc = self._home(name)
                if combined:  # inherited through extends: add only what is missing, in this service
                    have = combined.get("options") or {}
                    part = {} if driver else {"driver": policy.driver}
                    missing = {
                        k: v for k, v in want.items() if k not in have or (policy.mode == "enforce" and have[k] != v)
                    }
                    if policy.mode == "enforce" and driver != policy.driver:
                        part = {"driver": policy.driver}
                    if missing:
                        part["options"] = missing
                    if part:
                        planned.append((name, f, svc, "insert", {"logging": part}, combined, svc))
                    continue
                entry = {"logging": {"driver": policy.driver, "options": dict(want)}}
                planned.append((name, f, svc, "insert", entry, combined, svc))
                continue
            f, (lknode, lvnode, _owner), lnode = defs[-1]
            if isinstance(lnode, ScalarNode) and lnode.value in ("", "~", "null", "Null", "NULL"):
                entry = {"driver": policy.driver, "options": dict(want)}
                planned.append((name, f, lnode, "replace", (lknode, lvnode, entry), combined, lnode))
                continue
            if not isinstance(lnode, MappingNode):
                raise ComposeError(f.path, lknode.start_mark.line + 1, f"service {name!r}: `logging:` is not a map")
            c_opts = (combined or {}).get("options") or {}
            # driver
            if policy.mode == "enforce" and driver not in ROTATING_DRIVERS and driver is not None:
                entry = {"driver": policy.driver, "options": dict(want)}
                planned.append((name, f, lnode, "replace", (lknode, lvnode, entry), combined, lnode))
                continue
            dhit = lookup(lnode, "driver")
            if dhit is None:
                if driver is None:
                    planned.append((name, f, lnode, "insert", {"driver": policy.driver}, combined, lnode))
            elif policy.mode == "enforce" and driver != policy.driver:
                planned.append((name, f, lnode, "replace", (dhit[0], dhit[1], policy.driver), combined, dhit[1]))
            elif is_plain_nonstring(dhit[1]):
                planned.append((name, f, lnode, "replace", (dhit[0], dhit[1], scalar(dhit[1])), combined, dhit[1]))
            # options
            ohit = lookup(lnode, "options")
            onode = deref(ohit[1]) if ohit else None
            if ohit is not None and isinstance(onode, ScalarNode) and onode.value in ("", "~", "null"):
                planned.append((name, f, lnode, "replace", (ohit[0], ohit[1], dict(want)), combined, lnode))
                continue
            if ohit is not None and not isinstance(onode, MappingNode):
                raise ComposeError(
                    f.path, ohit[0].start_mark.line + 1, f"service {name!r}: `logging.options` is not a map"
                )
            own_opts = to_plain(ohit[1]) if ohit is not None else {}
            own_opts = own_opts if isinstance(own_opts, dict) else {}
            missing = {
                k: v
                for k, v in want.items()
                if k not in c_opts or (policy.mode == "enforce" and c_opts[k] != v and k not in own_opts)
            }
            if onode is None:
                if missing:
                    planned.append((name, f, lnode, "insert", {"options": missing}, combined, lnode))
                continue
            if missing:
                planned.append((name, f, onode, "insert", missing, combined, onode))
            for key in want:
                hit = lookup(onode, key)
                if hit is None:
                    continue
                value = scalar(hit[1])
                if policy.mode == "enforce" and value != want[key]:
                    planned.append((name, f, onode, "replace", (hit[0], hit[1], want[key]), combined, hit[1]))
                elif is_plain_nonstring(hit[1]) or not isinstance(deref(hit[1]), ScalarNode):
                    fixed = value if isinstance(deref(hit[1]), ScalarNode) else want[key]
                    planned.append((name, f, onode, "replace", (hit[0], hit[1], fixed), combined, hit[1]))
            for key in ("compress",):
                hit = lookup(onode, key)
                if hit is not None and is_plain_nonstring(hit[1]) and scalar(hit[1]) in ("true", "false"):
                    planned.append((name, f, onode, "replace", (hit[0], hit[1], scalar(hit[1])), combined, hit[1]))
        # defer services whose merge sources get an edit this pass: they may inherit it
        target_ids = {}
        for p in planned:
            target_ids.setdefault(id(deref(p[6])), set()).add(p[0])
        blocked = False
        done_nodes: set = set()
        for name, f, node, kind, payload, combined, tnode in planned:
            if self._inherits_from(name, f, target_ids):
                blocked = True
                continue
            key = (id(deref(tnode)), kind, json.dumps(payload if kind == "insert" else str(payload[2])))
            if key in done_nodes:
                changes.append(ServiceChange(name, f.path, kind, combined, None))
                continue
            done_nodes.add(key)
            if kind == "insert":
                edit = insert_entries(f, node, payload, f"logging for {name}")
            else:
                edit = replace_value(f, payload[0], payload[1], payload[2], f"logging for {name}")
            if any(g is f and e.start <= edit.end and edit.start <= e.end for g, e in edits):
                blocked = True  # touches another edit of this pass: do it in the next pass
                continue
            edits.append((f, edit))
            changes.append(ServiceChange(name, f.path, kind, combined, None))
        return edits, changes, skipped, blocked

    def _inherits_from(self, name: str, f: ComposeFile, target_ids: dict) -> bool:
        svc = f.services[name]
        stack = list(merge_sources(svc))
        found = self._extends_target(f, svc, name)
        if found is not None and found[0] in self.files:
            stack.append(found[1])
        seen = set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            for owner_names in [target_ids.get(id(m), set())]:
                if owner_names - {name}:
                    return True
            for _, v in m.value:
                v = deref(v)
                if isinstance(v, MappingNode) and target_ids.get(id(v), set()) - {name}:
                    return True
            stack.extend(merge_sources(m))
        return False

    def _home(self, name: str):
        """The file that defines a service: the first with image/build/extends for it, else the first."""
        defs = self.definitions(name)
        for f, svc in defs:
            if any(lookup(svc, k) for k in ("image", "build", "extends")):
                return f, svc
        return defs[0]

    # -- generic keys (healthcheck role) --

    def plan_service_keys(self, wanted: dict, mode: str = "add") -> PlanResult:
        """Set whole keys per service: wanted = {service: {key: plain value}}; `depends_on` entries are merged.

        add: write a key only where the service has none; enforce: also replace a differing value.
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}; use add or enforce")
        originals = {f.path: f.text for f in self.files}
        all_edits: dict[str, list] = {f.path: [] for f in self.files}
        changed: list[ServiceChange] = []
        missing = [s for s in wanted if s not in self.service_names()]
        if missing:
            raise ComposeError(
                self.files[0].path,
                None,
                f"no service named {', '.join(sorted(missing))}; check the service names in the role variables",
            )
        for name, keys in wanted.items():
            for key, value in keys.items():
                defs = [(f, svc, lookup(svc, key)) for f, svc in self.definitions(name)]
                present = [d for d in defs if d[2] is not None]
                if key == "depends_on":
                    edit_info = self._plan_depends_on(name, defs, present, value, mode)
                elif not present:
                    f, svc = self._home(name)
                    edit_info = (f, insert_entries(f, svc, {key: value}, f"{key} for {name}"), None)
                else:
                    f, _, (knode, vnode, owner) = present[-1]
                    current = to_plain(vnode)
                    if mode == "add" or current == _stringify(value):
                        continue
                    if owner is not f.services[name]:
                        edit_info = (f, insert_entries(f, f.services[name], {key: value}, f"{key} for {name}"), current)
                    else:
                        edit_info = (f, replace_value(f, knode, vnode, value, f"{key} for {name}"), current)
                if edit_info is None:
                    continue
                f, edit, before = edit_info
                self._reload(f, apply_edits(f.text, [edit]))
                all_edits[f.path].append(edit)
                changed.append(ServiceChange(name, f.path, key, {key: before} if before is not None else None, None))
        for ch in changed:
            hits = [lookup(svc, ch.action) for _, svc in self.definitions(ch.service)]
            hits = [h for h in hits if h is not None]
            ch.after = {ch.action: to_plain(hits[-1][1])} if hits else None
        results = [FileResult(f.path, f.real_path, originals[f.path], f.text, all_edits[f.path]) for f in self.files]
        allowed = set()
        for keys in wanted.values():
            allowed.update(keys)
        self._verify_only(results, allowed)
        names = sorted({c.service for c in changed})
        return PlanResult(results, changed, [], [n for n in wanted if n not in names])

    def _plan_depends_on(self, name, defs, present, value, mode):
        if not isinstance(value, dict):
            raise ValueError("depends_on must be given as a map: {service: {condition: ...}}")
        if not present:
            f, svc = self._home(name)
            return f, insert_entries(f, svc, {"depends_on": value}, f"depends_on for {name}"), None
        f, svc, (knode, vnode, owner) = present[-1]
        current = to_plain(vnode)
        node = deref(vnode)
        if isinstance(current, list):
            merged = {dep: {"condition": "service_started"} for dep in current}
            for dep, cond in value.items():
                merged[dep] = cond
            if owner is not svc:
                return f, insert_entries(f, svc, {"depends_on": merged}, f"depends_on for {name}"), current
            return f, replace_value(f, knode, vnode, merged, f"depends_on for {name}"), current
        if not isinstance(current, dict):
            raise ComposeError(
                f.path, knode.start_mark.line + 1, f"service {name!r}: depends_on is neither list nor map"
            )
        add = {}
        for dep, cond in value.items():
            have = current.get(dep)
            if have is None:
                add[dep] = cond
            elif isinstance(have, dict) and have != _stringify(cond) and (mode == "enforce" or "condition" not in have):
                merged = dict(current)
                merged.update(value)
                return f, replace_value(f, knode, vnode, merged, f"depends_on for {name}"), current
        if not add:
            return None
        if owner is not svc:
            merged = dict(current)
            merged.update(add)
            return f, insert_entries(f, svc, {"depends_on": merged}, f"depends_on for {name}"), current
        return f, insert_entries(f, node, add, f"depends_on for {name}"), current

    # -- proof and write --

    def _verify_only(self, results: list[FileResult], allowed: set) -> None:
        """Re-parse every changed file and prove that only `allowed` service keys differ."""
        for r in results:
            if not r.changed:
                continue
            before = load_data(r.before, r.path)
            try:
                after = load_data(r.after, r.path)
            except ComposeError as exc:
                raise ComposeError(r.path, exc.line, "the edit produced invalid YAML; nothing was written") from None
            if _strip(before, allowed) != _strip(after, allowed):
                raise ComposeError(
                    r.path, None, f"the edit would change more than {', '.join(sorted(allowed))}; nothing was written"
                )


def _stringify(value):
    if isinstance(value, dict):
        return {k: _stringify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _strip_nested(value, allowed: set):
    if isinstance(value, dict):
        return {k: _strip_nested(v, allowed) for k, v in value.items() if k not in allowed}
    if isinstance(value, list):
        return [_strip_nested(v, allowed) for v in value]
    return value


def _strip(data, allowed: set):
    """The data without the keys an edit may change: those keys in each service and in `x-` extensions."""
    data = copy.deepcopy(data)
    if isinstance(data, dict):
        for key in list(data):
            if isinstance(key, str) and key.startswith("x-"):
                value = data[key]
                if "logging" in allowed and isinstance(value, dict) and value and set(value) <= {"driver", "options"}:
                    data[key] = None
                else:
                    data[key] = _strip_nested(value, allowed)
    services = data.get("services") if isinstance(data, dict) else None
    if isinstance(services, dict):
        for svc in services.values():
            if isinstance(svc, dict):
                for key in allowed:
                    svc.pop(key, None)
    return data


def _drop_same_position(edits):
    """Two insertions into the same spot (shared node reached by two services) become one."""
    seen = set()
    out = []
    for f, e in edits:
        k = (id(f), e.start, e.end, e.text)
        if k in seen:
            continue
        seen.add(k)
        out.append((f, e))
    by_file: dict = {}
    for f, e in out:
        by_file.setdefault(id(f), []).append(e)
    for group in by_file.values():
        group.sort(key=lambda e: (e.start, e.end))
        for a, b in itertools.pairwise(group):
            if a.start == b.start == a.end == b.end:
                continue
            if b.start < a.end:
                raise ValueError("overlapping edits")
    return out


def write_atomic(path: str, text: str, backup: bool = False) -> str | None:
    """Replace the file behind `path` (symlinks resolved) atomically, keeping owner and mode.

    Returns the backup copy's path when `backup` is set.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    directory = os.path.dirname(real)
    backup_path = None
    if backup:
        import time

        backup_path = f"{real}.{time.strftime('%Y%m%d%H%M%S')}.bak"
        # Created 0600 and only then given the file's mode: a compose file may hold secrets (environment:).
        fd = os.open(backup_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(real, "rb") as src, os.fdopen(fd, "wb") as dst:
            os.fchmod(fd, 0o600)
            dst.write(src.read())
        os.chmod(backup_path, stat.S_IMODE(st.st_mode))
    fd, tmp = tempfile.mkstemp(prefix=".crab-compose-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        if hasattr(os, "chown"):
            with contextlib.suppress(PermissionError):
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, real)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return backup_path


def apply(plan: PlanResult, backup: bool = False) -> list[str]:
    """Write every changed file of a plan; returns backup paths."""
    backups = []
    for r in plan.files:
        if r.changed:
            b = write_atomic(r.path, r.after, backup)
            if b:
                backups.append(b)
    return backups


def finish_plan(module, plan: PlanResult, files: list[str], backup: bool, result: dict) -> list[str]:
    """The modules' common ending: diff when asked, write unless check mode; returns backup paths.

    `module` is the AnsibleModule (duck-typed: _diff, check_mode, fail_json), so this file stays Ansible-free.
    """
    result["files"] = files
    result["changed"] = plan.changed
    if module._diff:
        result["diff"] = plan.diff()
    if not plan.changed or module.check_mode:
        return []
    try:
        return apply(plan, backup=backup)
    except OSError as exc:
        module.fail_json(
            msg=f"Cannot write {exc.filename or files[0]}: {exc.strerror}; check the directory is writable.", **result
        )
        raise  # fail_json exits; this keeps the flow explicit for callers that are not AnsibleModule


def describe(plan: PlanResult) -> dict:
    return {
        "changed_services": sorted({c.service for c in plan.changed_services}),
        "changes": [
            {"service": c.service, "file": c.path, "action": c.action, "before": c.before, "after": c.after}
            for c in plan.changed_services
        ],
        "skipped": plan.skipped,
        "unchanged_services": plan.unchanged,
        "files": [r.path for r in plan.files if r.changed],
    }


DEFAULT_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")


def read_dotenv(path: str) -> dict:
    """KEY=value lines of a compose `.env` (quotes stripped, comments ignored)."""
    out: dict = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for raw in fh:
                line = raw.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                key, value = line.split("=", 1)
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                out[key.strip().removeprefix("export ").strip()] = value
    except FileNotFoundError:
        pass
    return out


def resolve_files(project_dir: str, files: list | None) -> list[str]:
    """The compose files of a project, as `docker compose` would pick them."""
    if files:
        return [f if os.path.isabs(f) else os.path.join(project_dir, f) for f in files]
    env = read_dotenv(os.path.join(project_dir, ".env"))
    listed = os.environ.get("COMPOSE_FILE") or env.get("COMPOSE_FILE")
    if listed:
        sep = os.environ.get("COMPOSE_PATH_SEPARATOR") or env.get("COMPOSE_PATH_SEPARATOR") or os.pathsep
        return [f if os.path.isabs(f) else os.path.join(project_dir, f) for f in listed.split(sep) if f]
    for name in DEFAULT_NAMES:
        candidate = os.path.join(project_dir, name)
        if os.path.exists(candidate):
            out = [candidate]
            # compose.yaml -> compose.override.yaml; from the name only (the directory may contain ".y" too)
            override = os.path.join(project_dir, name.replace(".y", ".override.y", 1))
            if os.path.exists(override):
                out.append(override)
            return out
    raise ComposeError(project_dir, None, f"no compose file ({', '.join(DEFAULT_NAMES)}); set the files to use")


# --- running containers ---------------------------------------------------------------------------


def log_drift(log_config: dict, driver: str, options: dict) -> list[str]:
    """What differs between a container's HostConfig.LogConfig and the expected driver/options."""
    drift = []
    have_driver = (log_config or {}).get("Type") or ""
    have_opts = (log_config or {}).get("Config") or {}
    if have_driver != driver:
        drift.append(f"driver is {have_driver or 'unset'}, expected {driver}")
    for key, want in options.items():
        if have_opts.get(key) != str(want):
            drift.append(f"{key} is {have_opts.get(key, 'unset')}, expected {want}")
    return drift


class ProjectLogVerifier:
    """Lists every container of a compose project (docker SDK) and compares its LogConfig with the expected."""

    def __init__(self, client, project: str):
        self.client = client
        self.project = project

    def containers(self) -> list:
        return self.client.containers.list(all=True, filters={"label": f"com.docker.compose.project={self.project}"})

    def check(self, driver: str, options: dict, exclude_services=(), running_only: bool = False) -> list[dict]:
        out = []
        for c in self.containers():
            attrs = c.attrs
            labels = attrs.get("Config", {}).get("Labels") or {}
            service = labels.get("com.docker.compose.service", "")
            state = attrs.get("State", {}).get("Status", "")
            if service in exclude_services or (running_only and state != "running"):
                continue
            log_config = attrs.get("HostConfig", {}).get("LogConfig") or {}
            drift = log_drift(log_config, driver, options)
            out.append(
                {
                    "name": attrs.get("Name", "").lstrip("/"),
                    "service": service,
                    "state": state,
                    "driver": log_config.get("Type"),
                    "options": log_config.get("Config") or {},
                    "ok": not drift,
                    "drift": drift,
                }
            )
        return sorted(out, key=lambda r: r["name"])
