"""Backup XML: secure parsing, schema validation and libvirt-exact formatting of `<domainbackup>`.

Every document goes through the checkpoint codec's secure front end (no DTD or entities, a size
cap, one-line `InvalidInput` errors). Validation is the project's own equivalent of libvirt's
`domainbackup.rng` plus the checks of `virDomainBackupDefParse`; formatting follows
`virDomainBackupDefFormat` byte for byte. Alignment against a domain happens elsewhere
(`vcfs.domain.align.align_backup`): this module only reads and writes documents.
"""

from __future__ import annotations

import re

from lxml import etree

# The checkpoint codec owns secure parsing and libvirt-style serialization. These helpers are
# private there but shared on purpose, so that both documents get exactly the same treatment.
from vcfs.adapters.xmlcodec import (
    _attr,
    _elements,
    _esc,
    _no_attributes,
    _parse,
    _serialize,
    _show,
    _text,
    _uint,
    parse_checkpoint,
)
from vcfs.domain.model import (
    FULL,
    INCREMENTAL,
    PULL,
    PUSH,
    BackupDef,
    BackupDisk,
    BackupServer,
    BackupStore,
)
from vcfs.errors import InvalidInput

_ROOT_CHILDREN = ("incremental", "server", "disks", "domaincheckpoint")
_DISK_ATTRIBUTES = (
    "name",
    "backup",
    "backupmode",
    "incremental",
    "exportname",
    "exportbitmap",
    "type",
    "index",
)
_DISK_STATES = ("running", "complete", "failed", "cancelling", "cancelled")
_YES_NO = ("yes", "no")
# Per transport, the <server> attributes besides `transport` and `tls`.
_SERVER_ATTRIBUTES = {"tcp": ("name", "port"), "unix": ("socket",), "fd": ("fdgroup",)}
# libvirt's storage formats (storagecommon.rng): what a push target may be written as.
_FORMATS = frozenset(
    "raw dir bochs cloop dmg iso vpc vdi fat vhd ploop luks cow qcow qcow2 qed vmdk".split()
)
_DISK_TARGET = re.compile(r"[a-zA-Z0-9_-]+")  # libvirt's diskTarget
_HOST = re.compile(r"[a-zA-Z0-9._:%-]+")  # a DNS name or an IPv4/IPv6 address
_MAX_UINT = (1 << 32) - 1
_STORE_WRAPPER = "storechildren"


# --- parsing ----------------------------------------------------------------------------------


def _children(el: etree._Element, allowed: tuple[str, ...]) -> dict[str, etree._Element]:
    """The child elements of `el` by tag: each in `allowed`, none twice."""
    seen: dict[str, etree._Element] = {}
    for child in _elements(el):
        if child.tag not in allowed:
            raise InvalidInput(f"unknown element <{child.tag}> in <{el.tag}>")
        if child.tag in seen:
            raise InvalidInput(f"duplicate element <{child.tag}> in <{el.tag}>")
        seen[child.tag] = child
    return seen


def _choice(el: etree._Element, attr: str, values: tuple[str, ...]) -> str | None:
    """An optional enumerated attribute."""
    value = el.get(attr)
    if value is not None and value not in values:
        raise InvalidInput(
            f"invalid {attr} {_show(value)} on <{el.tag}> (expected {' or '.join(values)})"
        )
    return value


def _verbatim(elements: list[etree._Element]) -> bytes:
    """Elements serialized libvirt style at depth 0, kept as they are for a later format."""
    return "".join(part for el in elements for part in _serialize(el, 0, {})).encode()


def _server(el: etree._Element) -> BackupServer:
    """The pull `<server>`: tcp (name, port), unix (absolute socket) or fd (fdgroup)."""
    if _elements(el):
        raise InvalidInput("<server> takes no child elements")
    transport = el.get("transport", "tcp")
    if transport == "rdma":
        raise InvalidInput("transport rdma is not supported for <server>")
    if transport not in _SERVER_ATTRIBUTES:
        raise InvalidInput(f"unknown transport {_show(transport)} for <server>")
    allowed = ("transport", "tls", *_SERVER_ATTRIBUTES[transport])
    for attr in el.attrib:
        if attr not in allowed:
            raise InvalidInput(
                f"attribute {_show(attr)} is not allowed on <server> with transport '{transport}'"
            )
    tls = _choice(el, "tls", _YES_NO)
    if transport == "unix":
        socket = el.get("socket")
        if socket is None:
            raise InvalidInput("missing socket for unix transport of <server>")
        if not socket.startswith("/"):
            raise InvalidInput(f"backup socket path {_show(socket)} must be absolute")
        return BackupServer("unix", socket=socket, tls=tls)
    if transport == "fd":
        fdgroup = el.get("fdgroup")
        if not fdgroup:
            raise InvalidInput("missing fdgroup for fd transport of <server>")
        return BackupServer("fd", fdgroup=fdgroup, tls=tls)
    # A tcp server may omit name and port: vcfs fills both in before starting the NBD server.
    name, port = el.get("name"), el.get("port")
    if name is not None and not _HOST.fullmatch(name):
        raise InvalidInput(f"invalid server name {_show(name)}: expected a host name or address")
    number = None
    if port is not None:
        number = _uint(port, "server port", 65535)
        if number == 0:
            raise InvalidInput("invalid server port '0': expected 1 to 65535")
    return BackupServer("tcp", name=name, port=number, tls=tls)


def _store(el: etree._Element, disk: str, disk_type: str | None) -> BackupStore:
    """A `<target>` or `<scratch>`: an absolute file or device path plus verbatim children."""
    for attr in el.attrib:
        if attr not in ("file", "dev"):
            raise InvalidInput(f"unknown attribute {_show(attr)} on <{el.tag}>")
    if len(el.attrib) != 1:
        raise InvalidInput(f"<{el.tag}> of disk {_show(disk)} needs one of file= or dev=")
    kind = "block" if "dev" in el.attrib else "file"
    if disk_type is not None and disk_type != kind:
        wanted = "dev" if disk_type == "block" else "file"
        raise InvalidInput(f"disk {_show(disk)} of type '{disk_type}' needs <{el.tag} {wanted}=>")
    path = el.get("dev" if kind == "block" else "file") or ""
    if not path.startswith("/"):
        raise InvalidInput(f"{el.tag} path {_show(path)} of disk {_show(disk)} must be absolute")
    extra = _elements(el)
    for child in extra:
        if child.tag not in ("seclabel", "encryption"):
            raise InvalidInput(f"unknown element <{child.tag}> in <{el.tag}>")
    if sum(child.tag == "encryption" for child in extra) > 1:
        raise InvalidInput(f"duplicate element <encryption> in <{el.tag}>")
    return BackupStore(path, kind, _verbatim(extra) or None)


def _driver(el: etree._Element, disk: str, mode: str) -> str:
    """The store format of `<driver type=…/>`; pull scratch images must be qcow2."""
    for attr in el.attrib:
        if attr != "type":
            raise InvalidInput(f"unknown attribute {_show(attr)} on <driver>")
    if _elements(el):
        raise InvalidInput("<driver> takes no child elements")
    fmt = el.get("type")
    if fmt is None:
        raise InvalidInput(f"<driver> of disk {_show(disk)} needs a type attribute")
    if fmt not in _FORMATS:
        raise InvalidInput(f"unknown driver type {_show(fmt)} for disk {_show(disk)}")
    if mode == PULL and fmt != "qcow2":
        raise InvalidInput(f"pull mode backup for disk {_show(disk)} requires qcow2 driver")
    return fmt


def _disk(el: etree._Element, mode: str, internal: bool) -> BackupDisk:
    """One `<disk>`. With backup='no' the rest is not read, as in libvirt."""
    if el.tag != "disk":
        raise InvalidInput(f"unknown element <{el.tag}> in <disks>")
    allowed = (*_DISK_ATTRIBUTES, "state") if internal else _DISK_ATTRIBUTES
    for attr in el.attrib:
        if attr not in allowed:
            raise InvalidInput(f"unknown attribute {_show(attr)} on <disk>")
    store_tag = "target" if mode == PUSH else "scratch"
    children = _children(el, ("driver", store_tag))
    name = el.get("name")
    if name is None:
        raise InvalidInput("missing name from disk backup element")
    if not _DISK_TARGET.fullmatch(name):
        raise InvalidInput(f"invalid disk name {_show(name)}: expected a target such as 'vda'")
    if _choice(el, "backup", _YES_NO) == "no":
        return BackupDisk(name, backup=False)

    disk_type = el.get("type")
    if disk_type is not None and disk_type not in ("file", "block"):
        raise InvalidInput(f"unsupported disk backup type {_show(disk_type)}")
    index = None
    if "index" in el.attrib:
        index = _uint(el.get("index", ""), f"index of disk {_show(name)}", _MAX_UINT)
    driver = None
    if "driver" in children:
        driver = _driver(children["driver"], name, mode)
    store = None
    if store_tag in children:
        store = _store(children[store_tag], name, disk_type)
    elif mode == PULL and disk_type == "block":
        raise InvalidInput(f"pull mode backup of block disk {_show(name)} requires <scratch dev=>")
    pull = mode == PULL  # export names only exist in pull mode; libvirt does not read them in push
    return BackupDisk(
        name,
        type=disk_type,
        backupmode=_choice(el, "backupmode", (FULL, INCREMENTAL)),
        incremental=el.get("incremental") or None,  # like <incremental>: empty is unset
        exportname=el.get("exportname") if pull else None,
        exportbitmap=el.get("exportbitmap") if pull else None,
        index=index,
        state=_choice(el, "state", _DISK_STATES) if internal else None,
        driver=driver,
        store=store,
    )


def parse_backup(data: bytes, *, internal: bool = False) -> BackupDef:
    """Parse and validate a `<domainbackup>` document.

    `internal` accepts libvirt's status-XML additions: `<disk state=…>` and `<privateData>`
    (kept verbatim). A `<domaincheckpoint>` child (vcfs's combined form) is parsed in create
    mode into `checkpoint`. Nothing is defaulted or aligned. Raises InvalidInput (one line) or
    TooLarge.
    """
    root = _parse(data, "domainbackup")
    for attr in root.attrib:
        if attr != "mode":
            raise InvalidInput(f"unknown attribute {_show(attr)} on <domainbackup>")
    mode = root.get("mode", PUSH)
    if mode not in (PUSH, PULL):
        raise InvalidInput(f"unknown backup mode {_show(mode)}")
    allowed = (*_ROOT_CHILDREN, "privateData") if internal else _ROOT_CHILDREN
    seen = _children(root, allowed)

    # An empty <incremental> is no incremental, as libvirt's XPath string helper reads it.
    incremental = (_text(seen["incremental"]) or None) if "incremental" in seen else None
    server = None
    if "server" in seen:
        if mode != PULL:
            raise InvalidInput("use of <server> requires pull mode backup")
        server = _server(seen["server"])
    disks = None
    if "disks" in seen:
        _no_attributes(seen["disks"])
        disks = tuple(_disk(d, mode, internal) for d in _elements(seen["disks"]))
    private_data = _verbatim([seen["privateData"]]) if "privateData" in seen else None
    checkpoint = None
    if "domaincheckpoint" in seen:
        checkpoint = parse_checkpoint(_verbatim([seen["domaincheckpoint"]]), redefine=False)
    return BackupDef(
        mode=mode,
        incremental=incremental,
        server=server,
        disks=disks,
        checkpoint=checkpoint,
        private_data=private_data,
    )


# --- formatting -------------------------------------------------------------------------------


def _format_server(server: BackupServer) -> str:
    """The `<server/>` line, attributes in libvirt's order."""
    line = f"  <server transport={_attr(server.transport)}"
    if server.tls is not None:
        line += f" tls={_attr(server.tls)}"
    if server.name is not None:
        line += f" name={_attr(server.name)}"
    if server.port:
        line += f" port='{server.port}'"
    if server.socket is not None:
        line += f" socket={_attr(server.socket)}"
    if server.fdgroup is not None:
        line += f" fdgroup={_attr(server.fdgroup)}"
    return line + "/>\n"


def _format_store(store: BackupStore, tag: str) -> list[str]:
    """A `<target>` or `<scratch>` at depth 3, its verbatim children re-indented below it."""
    head = f"      <{tag} {'dev' if store.kind == 'block' else 'file'}={_attr(store.path)}"
    if not store.extra:
        return [head + "/>\n"]
    # The children were serialized one after the other: wrap them to read them back as one tree.
    wrapped = f"<{_STORE_WRAPPER}>".encode() + store.extra + f"</{_STORE_WRAPPER}>".encode()
    wrapper = _parse(wrapped, _STORE_WRAPPER)
    out = [head + ">\n"]
    for child in wrapper:
        out += _serialize(child, 4, {})
    return out + [f"      </{tag}>\n"]


def _format_disk(disk: BackupDisk, mode: str, internal: bool) -> list[str]:
    """One `<disk>` at depth 2, attributes and children in libvirt's order."""
    line = f"    <disk name={_attr(disk.name)} backup='{'yes' if disk.backup else 'no'}'"
    if internal and disk.state is not None:
        line += f" state={_attr(disk.state)}"
    if not disk.backup:
        return [line + "/>\n"]
    # libvirt always writes the store type; before alignment it may only be known from the store.
    kind = disk.type or (disk.store.kind if disk.store else "file")
    line += f" type={_attr(kind)}"
    for attr in ("backupmode", "incremental", "exportname", "exportbitmap"):
        value = getattr(disk, attr)
        if value is not None:
            line += f" {attr}={_attr(value)}"
    if disk.index:
        line += f" index='{disk.index}'"
    children = []
    if disk.driver is not None:
        children.append(f"      <driver type={_attr(disk.driver)}/>\n")
    if disk.store is not None:
        children += _format_store(disk.store, "target" if mode == PUSH else "scratch")
    if not children:
        return [line + "/>\n"]
    return [line + ">\n", *children, "    </disk>\n"]


def format_backup(backup: BackupDef, *, internal: bool = False) -> bytes:
    """A `<domainbackup>` document exactly as libvirt formats it.

    `internal` adds the status-XML parts (`state`, `<privateData>`). The combined-form
    `checkpoint` is not written: the live backup's checkpoint is shown on its own.
    """
    out = []
    if backup.incremental is not None:
        out.append(f"  <incremental>{_esc(backup.incremental)}</incremental>\n")
    if backup.server is not None:
        out.append(_format_server(backup.server))
    if backup.disks:
        out.append("  <disks>\n")
        for disk in backup.disks:
            out += _format_disk(disk, backup.mode, internal)
        out.append("  </disks>\n")
    if internal and backup.private_data:
        out += _serialize(_parse(backup.private_data, "privateData"), 1, {})
    head = f"<domainbackup mode={_attr(backup.mode)}"
    if not out:
        return f"{head}/>\n".encode()
    return "".join([f"{head}>\n", *out, "</domainbackup>\n"]).encode()
