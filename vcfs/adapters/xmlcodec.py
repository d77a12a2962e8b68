"""Checkpoint and domain XML: secure parsing, schema validation and libvirt-exact formatting.

The only module that imports lxml. Every document from the user goes through `_feed`, which
refuses DTDs and entities before lxml sees a byte, caps the size, and turns every parser error
into a one-line `InvalidInput`. Validation is the project's own equivalent of libvirt's
`domaincheckpoint.rng`; formatting follows `virDomainCheckpointDefFormat` byte for byte.
"""

from __future__ import annotations

import codecs
import re

from lxml import etree

from vcfs.domain.model import BITMAP, NO, CheckpointDef, CheckpointDisk, DiskRef, DomainInfo
from vcfs.domain.names import NAME_PATTERN
from vcfs.errors import InvalidInput, TooLarge

MAX_DOCUMENT = 1 << 20
"""The largest XML document accepted, in bytes."""

_UINT = re.compile(r"[0-9]{1,20}")
_MAX_LONG = (1 << 63) - 1  # creationTime is a C long long in libvirt
_MAX_ULONG = (1 << 64) - 1

# DTDs are refused before parsing, so "internal" never has anything to expand; it is chosen over
# False because lxml then reports undefined entities at feed() instead of silently stopping.
_PARSER_OPTIONS = dict(
    resolve_entities="internal",
    no_network=True,
    load_dtd=False,
    huge_tree=False,  # keeps libxml2's depth (256) and text-size limits
    encoding="utf-8",  # overrides any encoding declaration: the bytes were checked as UTF-8
)

_CHECKPOINT_CHILDREN = ("name", "description", "parent", "creationTime", "disks", "domain")
_DISK_ATTRIBUTES = ("name", "checkpoint", "bitmap", "size")

# Characters XML 1.0 cannot carry; libvirt's formatter drops them, so do we.
_UNWRITABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"}
# In attributes, also keep tab/newline/CR as references: a reader would turn them into spaces.
_ATTR_ESCAPES = {**_ESCAPES, "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
_TEXT_SPECIAL = re.compile("[&<>'\"]")
_ATTR_SPECIAL = re.compile("[&<>'\"\t\n\r]")
_XML_NS = "http://www.w3.org/XML/1998/namespace"


# --- secure parsing ---------------------------------------------------------------------------


def _show(value: str) -> str:
    """A user value quoted for a one-line message, cut when long."""
    return repr(value if len(value) <= 64 else value[:61] + "...")


def _check_bytes(data: bytes) -> None:
    """Reject what must never reach the parser: oversize, NUL, bad UTF-8, a DTD."""
    if len(data) > MAX_DOCUMENT:
        raise TooLarge(f"XML document of {len(data)} bytes exceeds the {MAX_DOCUMENT}-byte limit")
    if b"\0" in data:
        raise InvalidInput(f"malformed XML: NUL byte at offset {data.index(0)}")
    try:
        # Not final: a multi-byte character cut at the end of a prefix is incomplete, not bad.
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError as e:
        raise InvalidInput(f"malformed XML: invalid UTF-8 at byte offset {e.start}") from None
    if _prolog_has_doctype(text):
        raise InvalidInput("malformed XML: DOCTYPE and ENTITY declarations are not allowed")


def _prolog_has_doctype(text: str) -> bool:
    """Whether the prolog (before the root element) holds a `<!DOCTYPE`.

    The prolog can only hold whitespace, comments and processing instructions, so any other `<!`
    there is a DOCTYPE (or a syntax error the parser would report anyway). An unfinished prolog
    answers False: the DOCTYPE, if any, is caught once more bytes arrive.
    """
    i = 1 if text.startswith("\ufeff") else 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if text.startswith("<?", i):
            end = text.find("?>", i + 2)
        elif text.startswith("<!--", i):
            end = text.find("-->", i + 4)
        else:
            rest = text[i : i + 4]
            return rest.startswith("<!") and not "<!--".startswith(rest)
        if end < 0:
            return False
        i = end + 2 if text[end] == "?" else end + 3


def _syntax_error(e: etree.LxmlError) -> InvalidInput:
    """lxml's error as one readable line: position, then libxml2's message."""
    # The entry behind this exception is the log's last one (lxml's log is shared, not per-parse).
    entry = getattr(getattr(e, "error_log", None), "last_error", None)
    if entry is not None:
        where, message = f"line {entry.line}, column {entry.column}", entry.message
    else:
        where, message = f"line {getattr(e, 'lineno', 0)}", getattr(e, "msg", None) or str(e)
    return InvalidInput(f"malformed XML: {where}: {' '.join(message.split())}")


def _feed(data: bytes) -> tuple[etree.XMLPullParser, bool]:
    """Check and feed `data` to a fresh pull parser; also whether the root element is closed."""
    _check_bytes(data)
    parser = etree.XMLPullParser(events=("start", "end", "comment", "pi"), **_PARSER_OPTIONS)
    depth, closed = 0, False
    try:
        parser.feed(data)
        for event, _ in parser.read_events():
            if closed:
                # A comment or PI after the root: legal XML, but a request ends at its root.
                raise InvalidInput("malformed XML: content after the root element")
            if event == "start":
                depth += 1
            elif event == "end":
                depth -= 1
                closed = depth == 0
    except etree.LxmlError as e:
        raise _syntax_error(e) from None
    return parser, closed


def _close(parser: etree.XMLPullParser) -> etree._Element:
    """Finish parsing; raises InvalidInput on truncation or trailing garbage."""
    try:
        root = parser.close()
    except etree.LxmlError as e:
        raise _syntax_error(e) from None
    if root is None or root.getroottree().docinfo.internalDTD is not None:  # belt and braces
        raise InvalidInput("malformed XML: not a plain XML document")
    return root


def document_complete(data: bytes) -> bool:
    """Whether `data` holds exactly one complete XML document (trailing whitespace allowed).

    False for a still-incomplete prefix, including empty or whitespace-only data. Raises
    InvalidInput when no continuation could make it valid XML (syntax error, DTD, bad UTF-8,
    content after the root), TooLarge above MAX_DOCUMENT bytes.
    """
    parser, closed = _feed(data)
    if closed:
        _close(parser)  # catches trailing non-whitespace that feed() is still waiting on
    return closed


def _parse(data: bytes, root_tag: str) -> etree._Element:
    """Securely parse one complete document whose root must be `<root_tag>`."""
    parser, closed = _feed(data)
    if not data.strip():
        raise InvalidInput("malformed XML: empty document")
    root = _close(parser)  # when not closed, this raises libxml2's "premature end" message
    if not closed:
        raise InvalidInput("malformed XML: incomplete document")
    if root.tag != root_tag:
        raise InvalidInput(f"expected a <{root_tag}> document, not <{root.tag}>")
    return root


# --- checkpoint validation --------------------------------------------------------------------


def _elements(el: etree._Element) -> list[etree._Element]:
    """The child elements of a container, which may hold no text besides whitespace."""
    if (el.text or "").strip() or any((c.tail or "").strip() for c in el):
        raise InvalidInput(f"unexpected text in <{el.tag}>")
    # Comments and PIs are invisible to the schema, as in RELAX NG.
    return [c for c in el if isinstance(c.tag, str)]


def _no_attributes(el: etree._Element) -> None:
    """Reject any attribute on an element the schema gives none."""
    for attr in el.attrib:
        raise InvalidInput(f"unknown attribute {_show(attr)} on <{el.tag}>")


def _text(el: etree._Element) -> str:
    """The text of a leaf element without attributes."""
    _no_attributes(el)
    for child in el:
        if isinstance(child.tag, str):
            raise InvalidInput(f"unexpected element <{child.tag}> in <{el.tag}>")
    return "".join(el.itertext())


def _name(value: str, what: str) -> str:
    """A checkpoint or bitmap name, checked against libvirt's file-name-safe pattern."""
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidInput(f"invalid {what} {_show(value)}: must match {NAME_PATTERN.pattern}")
    return value


def _uint(value: str, what: str, maximum: int) -> int:
    """A non-negative decimal integer no larger than `maximum`."""
    if not _UINT.fullmatch(value) or int(value) > maximum:
        raise InvalidInput(f"invalid {what} {_show(value)}: expected a non-negative integer")
    return int(value)


def _parent(el: etree._Element) -> str:
    """The name inside `<parent>`, which holds exactly one `<name>`."""
    _no_attributes(el)
    children = _elements(el)
    if len(children) != 1 or children[0].tag != "name":
        raise InvalidInput("<parent> must hold exactly one <name>")
    return _name(_text(children[0]), "parent name")


def _disk(el: etree._Element) -> CheckpointDisk:
    """One `<disk>`: `checkpoint='no'` alone, or bitmap with optional bitmap name and size."""
    if el.tag != "disk":
        raise InvalidInput(f"unknown element <{el.tag}> in <disks>")
    for child in _elements(el):
        raise InvalidInput(f"unexpected element <{child.tag}> in <disk>")
    for attr in el.attrib:
        if attr not in _DISK_ATTRIBUTES:
            raise InvalidInput(f"unknown attribute {_show(attr)} on <disk>")
    name = el.get("name")
    if not name:
        raise InvalidInput("<disk> needs a non-empty name attribute")
    kind = el.get("checkpoint", BITMAP)
    if kind not in (BITMAP, NO):
        raise InvalidInput(
            f"disk {_show(name)}: invalid checkpoint type {_show(kind)} (expected 'bitmap' or 'no')"
        )
    bitmap, size = el.get("bitmap"), el.get("size")
    if kind == NO and (bitmap is not None or size is not None):
        attr = "bitmap" if bitmap is not None else "size"
        raise InvalidInput(f"disk {_show(name)}: {attr}= is not allowed with checkpoint='no'")
    if bitmap is not None:
        _name(bitmap, f"bitmap name for disk {_show(name)}")
    if size is not None:
        _uint(size, f"size for disk {_show(name)}", _MAX_ULONG)  # valid, but output only
    return CheckpointDisk(name=name, checkpoint=kind, bitmap=bitmap)


def parse_checkpoint(data: bytes, *, redefine: bool) -> CheckpointDef:
    """Parse and validate a `<domaincheckpoint>` document.

    Create mode keeps only name, description and disks; redefine mode also keeps parent,
    creationTime and the `<domain>` element (re-serialized, libvirt style), and requires a name
    and a creationTime. Raises InvalidInput (one line) or TooLarge.
    """
    root = _parse(data, "domaincheckpoint")
    _no_attributes(root)
    seen: dict[str, etree._Element] = {}
    for child in _elements(root):
        if child.tag not in _CHECKPOINT_CHILDREN:
            raise InvalidInput(f"unknown element <{child.tag}> in <domaincheckpoint>")
        if child.tag in seen:
            raise InvalidInput(f"duplicate element <{child.tag}> in <domaincheckpoint>")
        seen[child.tag] = child

    # Validate everything first, even what create mode then drops: the schema applies to both.
    name = _name(_text(seen["name"]), "checkpoint name") if "name" in seen else None
    # An empty description is no description, as libvirt's XPath string helpers read it.
    description = (_text(seen["description"]) or None) if "description" in seen else None
    parent = _parent(seen["parent"]) if "parent" in seen else None
    created = None
    if "creationTime" in seen:
        created = _uint(_text(seen["creationTime"]), "creationTime", _MAX_LONG)
    disks = None
    if "disks" in seen:
        _no_attributes(seen["disks"])
        disks = tuple(_disk(d) for d in _elements(seen["disks"]))
    if not redefine:
        return CheckpointDef(name=name, description=description, disks=disks)

    if name is None:
        raise InvalidInput("a redefined checkpoint must have a name")
    if created is None:
        raise InvalidInput("a redefined checkpoint must have a creationTime")
    domain_xml = None
    if "domain" in seen:
        domain_xml = "".join(_serialize(seen["domain"], 0, {})).encode()
    return CheckpointDef(
        name=name,
        description=description,
        parent=parent,
        creation_time=created,
        disks=disks,
        domain_xml=domain_xml,
    )


# --- formatting -------------------------------------------------------------------------------


def _esc(value: str) -> str:
    """Text content escaped as libvirt does (all five XML specials)."""
    value = _UNWRITABLE.sub("", value)
    return _TEXT_SPECIAL.sub(lambda m: _ESCAPES[m.group()], value)


def _attr(value: str) -> str:
    """A single-quoted, escaped attribute value."""
    value = _UNWRITABLE.sub("", value)
    return "'" + _ATTR_SPECIAL.sub(lambda m: _ATTR_ESCAPES[m.group()], value) + "'"


def _qname(name: str, nsmap: dict[str | None, str], element: bool) -> str:
    """`{uri}local` back to `prefix:local` using the in-scope namespaces."""
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    if uri == _XML_NS:
        return f"xml:{local}"
    for prefix, bound in nsmap.items():
        # An unprefixed attribute is never in the default namespace.
        if bound == uri and (prefix is not None or element):
            return f"{prefix}:{local}" if prefix else local
    return local  # unreachable for a tree lxml parsed


def _serialize(el: etree._Element, depth: int | None, outer: dict) -> list[str]:
    """An element libvirt style: 2-space indentation, single quotes, self-closing when empty.

    `depth` None means inside mixed content, which is copied without re-indentation so that
    its text survives. `outer` is the namespace map of the enclosing output, so that only new
    declarations are written and the result stands alone.
    """
    pad, nl = ("", "") if depth is None else ("  " * depth, "\n")
    if isinstance(el, etree._Comment):
        return [f"{pad}<!--{el.text or ''}-->{nl}"]
    if isinstance(el, etree._ProcessingInstruction):
        return [f"{pad}<?{el.target}{' ' + el.text if el.text else ''}?>{nl}"]
    nsmap = el.nsmap
    tag = _qname(el.tag, nsmap, element=True)
    head = f"<{tag}"
    for key, value in el.attrib.items():
        head += f" {_qname(key, nsmap, element=False)}={_attr(value)}"
    # Declarations after the attributes, where libvirt writes them (`<domain type= xmlns:qemu=`).
    for prefix, uri in nsmap.items():
        if outer.get(prefix) != uri:
            head += f" xmlns:{prefix}={_attr(uri)}" if prefix else f" xmlns={_attr(uri)}"
    if None in outer and None not in nsmap:
        head += " xmlns=''"
    children = list(el)
    if not children:
        if not el.text:
            return [f"{pad}{head}/>{nl}"]
        return [f"{pad}{head}>{_esc(el.text)}</{tag}>{nl}"]
    # Mixed content (or inside it): no indentation, which would change the text.
    if depth is None or any(t.strip() for t in [el.text or ""] + [c.tail or "" for c in el]):
        out = [f"{pad}{head}>{_esc(el.text or '')}"]
        for child in children:
            out += _serialize(child, None, nsmap)
            out.append(_esc(child.tail or ""))
        return out + [f"</{tag}>{nl}"]
    out = [f"{pad}{head}>\n"]
    for child in children:
        out += _serialize(child, depth + 1, nsmap)
    return out + [f"{pad}</{tag}>\n"]


def _comment(text: str) -> str:
    """Text made safe for an XML comment on one line."""
    text = " ".join(_UNWRITABLE.sub("", text).split())
    while "--" in text:
        text = text.replace("--", "-")
    return text


def format_checkpoint(
    cp: CheckpointDef, *, include_domain: bool = True, comment: str | None = None
) -> bytes:
    """A `<domaincheckpoint>` document exactly as libvirt formats it.

    Elements in libvirt's fixed order, each omitted when unset (creationTime also when 0).
    `comment`, if given, becomes an XML comment right after `<name>`. The embedded domain is
    written at depth 1 when `include_domain` and `cp.domain_xml` are set.
    """
    out = ["<domaincheckpoint>\n"]
    if cp.name is not None:
        out.append(f"  <name>{_esc(cp.name)}</name>\n")
    if comment is not None:
        out.append(f"  <!-- {_comment(comment)} -->\n")
    if cp.description is not None:
        out.append(f"  <description>{_esc(cp.description)}</description>\n")
    if cp.parent is not None:
        out.append(f"  <parent>\n    <name>{_esc(cp.parent)}</name>\n  </parent>\n")
    if cp.creation_time:
        out.append(f"  <creationTime>{cp.creation_time}</creationTime>\n")
    if cp.disks:
        out.append("  <disks>\n")
        for disk in cp.disks:
            if not disk.name:
                continue  # libvirt prints nothing for a disk without a name
            line = f"    <disk name={_attr(disk.name)} checkpoint={_attr(disk.checkpoint)}"
            if disk.checkpoint == BITMAP and disk.bitmap:
                line += f" bitmap={_attr(disk.bitmap)}"
            if disk.size is not None:
                line += f" size='{disk.size}'"
            out.append(line + "/>\n")
        out.append("  </disks>\n")
    if include_domain and cp.domain_xml:
        out += _serialize(_parse(cp.domain_xml, "domain"), 1, {})
    out.append("</domaincheckpoint>\n")
    return "".join(out).encode()


def format_domain(info: DomainInfo) -> bytes:
    """A minimal libvirt-style `<domain>` for a running VM, as embedded in its checkpoints.

    `<capacity unit='bytes'>` is a vcfs extension carrying each disk's virtual size.
    """
    out = ["<domain type='kvm'>\n", f"  <name>{_esc(info.name)}</name>\n"]
    if info.uuid:
        out.append(f"  <uuid>{_esc(info.uuid)}</uuid>\n")
    out.append("  <devices>\n")
    for disk in info.disks:
        out.append("    <disk type='file' device='disk'>\n")
        out.append(f"      <driver name='qemu' type={_attr(disk.driver)}/>\n")
        if disk.source:
            out.append(f"      <source file={_attr(disk.source)}/>\n")
        out.append(f"      <target dev={_attr(disk.target)} bus='virtio'/>\n")
        if disk.read_only:
            out.append("      <readonly/>\n")
        out.append(f"      <capacity unit='bytes'>{disk.size}</capacity>\n")
        out.append("    </disk>\n")
    out.append("  </devices>\n</domain>\n")
    return "".join(out).encode()


def parse_domain(domain_xml: bytes) -> tuple[str | None, list[DiskRef]]:
    """The UUID and the disks of a `<domain>` document, in document order.

    A disk's source is its file or device path; a disk without one is empty (e.g. a cdrom with
    no media). Raises InvalidInput on malformed XML or a disk without a target.
    """
    root = _parse(domain_xml, "domain")
    uuid = (root.findtext("uuid") or "").strip() or None
    disks = []
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            raise InvalidInput("domain XML: a <disk> has no <target dev='...'>")
        source_el = disk.find("source")
        source = None
        if source_el is not None:
            source = source_el.get("file") or source_el.get("dev") or None
        read_only = disk.find("readonly") is not None
        disks.append(DiskRef(dev, source, read_only, empty=source is None))
    return uuid, disks
