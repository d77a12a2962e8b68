"""The XML the libvirt backend reads from libvirt and completes before handing it over (lxml).

What a user writes to `new` goes to libvirt as it is, except for what vcfs must add: the
backup's `<domaincheckpoint>` child (vcfs's combined form) becomes backupBegin's own checkpoint
argument, and a pull backup gets vcfs's defaults where the document names none (a unix socket
in the runtime directory; a scratch file per disk, since libvirt 9.0's own default scratch
fails here with "argument key 'filename' must not have null value"; a free TCP port).
Thread rule: pure functions, any thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from vcfs.domain.model import CheckpointDef, CheckpointDisk
from vcfs.domain.names import MAX_NAME_BYTES, RESERVED
from vcfs.errors import InvalidInput, TooLarge

MAX_DOCUMENT = 1 << 20

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=False)


def parse(data: bytes, what: str) -> etree._Element:
    """The root of a document a user wrote (InvalidInput when it is not well-formed XML)."""
    if len(data) > MAX_DOCUMENT:
        raise TooLarge(f"{what} document is larger than {MAX_DOCUMENT} bytes")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as e:
        raise InvalidInput(f"malformed {what} XML: {e}") from None
    if root is None:
        raise InvalidInput(f"empty {what} document")
    if root.getroottree().docinfo.doctype:
        # Entities stay unresolved, and libvirt would get references it cannot resolve.
        raise InvalidInput(f"a {what} document must not have a DOCTYPE")
    return root


def _text(el: etree._Element | None) -> str | None:
    return el.text.strip() if el is not None and el.text else None


def checkpoint_name(data: bytes) -> str | None:
    """The `<name>` of a `<domaincheckpoint>` document, refused when vcfs reserves it."""
    root = parse(data, "checkpoint")
    name = _text(root.find("name"))
    if name is not None and (name in RESERVED or len(name.encode()) > MAX_NAME_BYTES):
        raise InvalidInput(f"checkpoint name {name!r} is reserved or too long")
    return name


@dataclass(frozen=True)
class DomainDisk:
    """A `<disk>` of a domain's XML, as much as backups and checkpoints need."""

    target: str
    device: str
    driver: str | None
    source: str | None
    read_only: bool

    @property
    def bitmap_capable(self) -> bool:
        """Whether libvirt can put a checkpoint's bitmap on it (qcow2, writable)."""
        return self.device == "disk" and self.driver == "qcow2" and not self.read_only

    @property
    def backup_capable(self) -> bool:
        """Whether a backup can copy it (a disk with an image)."""
        return self.device == "disk" and self.source is not None


def domain_disks(domain_xml: str) -> list[DomainDisk]:
    """The disks of a `<domain>` document, in its order."""
    root = etree.fromstring(domain_xml.encode(), _PARSER)
    disks = []
    for el in root.iterfind("devices/disk"):
        target = el.find("target")
        if target is None or not target.get("dev"):
            continue
        driver, source = el.find("driver"), el.find("source")
        disks.append(DomainDisk(
            target=target.get("dev"),
            device=el.get("device", "disk"),
            driver=driver.get("type") if driver is not None else None,
            source=(source.get("file") or source.get("dev") or source.get("name"))
            if source is not None else None,
            read_only=el.find("readonly") is not None,
        ))
    return disks


def default_checkpoint(name: str, disks: list[DomainDisk]) -> str:
    """`mkdir NAME`: a bitmap on every disk that can hold one, the others `checkpoint='no'`."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    listed = etree.SubElement(root, "disks")
    for d in disks:
        etree.SubElement(listed, "disk", name=d.target,
                         checkpoint="bitmap" if d.bitmap_capable else "no")
    return etree.tostring(root, encoding="unicode")


def checkpoint_definition(xml: str) -> CheckpointDef:
    """Name, parent, creation time and disks (with `size` when libvirt gave it)."""
    root = etree.fromstring(xml.encode(), _PARSER)
    created = _text(root.find("creationTime"))
    disks = tuple(
        CheckpointDisk(
            d.get("name", ""), d.get("checkpoint", "bitmap"), d.get("bitmap"),
            int(d.get("size")) if d.get("size") else None,
        )
        for d in root.iterfind("disks/disk")
    )
    return CheckpointDef(
        name=_text(root.find("name")),
        description=_text(root.find("description")),
        parent=_text(root.find("parent/name")),
        creation_time=int(created) if created and created.isdigit() else None,
        disks=disks,
    )


@dataclass(frozen=True)
class BackupRequest:
    """A `<domainbackup>` document made ready for `backupBegin`."""

    backup_xml: str
    checkpoint_xml: str | None
    mode: str
    checkpoint: str | None
    """The name of the checkpoint the backup creates, when it names one."""


def backup_request(
    data: bytes | None,
    disks: list[DomainDisk],
    server: dict[str, str],
    scratch: Callable[[str], str],
    free_port: Callable[[str], int],
) -> BackupRequest:
    """A user's `<domainbackup>` (None: `mkdir`, a full pull backup) with vcfs's defaults.

    `server` holds the attributes of the `<server>` a pull backup gets when it names none,
    `scratch(target)` names a new scratch file for a disk, `free_port(host)` a TCP port.
    """
    root = parse(data, "backup") if data is not None else etree.Element("domainbackup",
                                                                        mode="pull")
    if root.tag != "domainbackup":
        raise InvalidInput(f"expected <domainbackup>, not <{root.tag}>")
    checkpoint_xml = checkpoint = None
    cp = root.find("domaincheckpoint")
    if cp is not None:
        root.remove(cp)
        checkpoint_xml = etree.tostring(cp, encoding="unicode")
        checkpoint = checkpoint_name(checkpoint_xml.encode())
    mode = root.get("mode", "push")  # libvirt's default
    for el in root.iterfind("disks/disk"):
        # libvirt 9.0's schema wants type='file' beside a <target file> or <scratch file>;
        # vcfs's QMP backend (and libvirt's own parser) take the file attribute as saying so.
        store = el.find("target") if el.find("target") is not None else el.find("scratch")
        if store is not None and store.get("file") and el.get("type") is None:
            el.set("type", "file")
    if mode == "pull":
        el = root.find("server")
        if el is None:
            el = etree.SubElement(root, "server", **server)
        if el.get("transport") == "unix" and not el.get("socket") and server.get("socket"):
            el.set("socket", server["socket"])  # in vcfs's runtime directory
        if el.get("transport", "tcp") == "tcp" and not el.get("port"):
            # libvirt 9.0 demands a port; the contract gives TCP without one a free port.
            el.set("port", str(free_port(el.get("name") or "localhost")))
        listed = root.find("disks")
        if listed is None:
            listed = etree.SubElement(root, "disks")
            for d in disks:
                el = etree.SubElement(listed, "disk", name=d.target)
                if not d.backup_capable:
                    el.set("backup", "no")
        for el in listed.iterfind("disk"):
            if el.get("backup") == "no" or el.find("scratch") is not None:
                continue
            if el.get("type", "file") == "file":
                el.set("type", "file")
                etree.SubElement(el, "scratch", file=scratch(el.get("name", "")))
    return BackupRequest(etree.tostring(root, encoding="unicode"), checkpoint_xml, mode,
                         checkpoint)


@dataclass(frozen=True)
class BackupDisk:
    """One backed-up disk of libvirt's backup XML."""

    target: str
    mode: str
    """`full` or `incremental`."""
    incremental: str | None
    export_name: str | None
    export_bitmap: str | None
    scratch: str | None = None
    """A pull disk's scratch file, when it is a file."""


@dataclass(frozen=True)
class BackupServer:
    """Where a pull backup's NBD server listens."""

    transport: str
    socket: str | None
    host: str | None
    port: int | None
    tls: bool


def backup_facts(xml: str) -> tuple[BackupServer | None, list[BackupDisk]]:
    """The server and the backed-up disks of `backupGetXMLDesc`'s document."""
    root = etree.fromstring(xml.encode(), _PARSER)
    server = None
    el = root.find("server")
    if el is not None:
        port = el.get("port")
        server = BackupServer(el.get("transport", "tcp"), el.get("socket"), el.get("name"),
                              int(port) if port else None, el.get("tls") == "yes")
    disks = [
        BackupDisk(d.get("name", ""), d.get("backupmode", "full"), d.get("incremental"),
                   d.get("exportname"), d.get("exportbitmap"),
                   d.find("scratch").get("file") if d.find("scratch") is not None else None)
        for d in root.iterfind("disks/disk")
        if d.get("backup", "yes") == "yes"
    ]
    return server, disks
