"""The libvirt backend's pure parts: the XML it completes for libvirt, and its error map."""

from __future__ import annotations

import libvirt
import pytest
from lxml import etree

from vcfs.adapters.virt import documents
from vcfs.adapters.virt.errors import translate
from vcfs.errors import (
    AlreadyExists,
    BackendError,
    Busy,
    InvalidInput,
    NotFound,
    NotSupported,
    TooLarge,
)

DOMAIN = """<domain type='kvm'><name>lv1</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/>
    <source file='/img/b.raw'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
    <target dev='sda' bus='sata'/><readonly/></disk>
</devices></domain>"""


SERVER = {"transport": "unix", "socket": "/run/vcfs/lv1-1.sock"}


def disks() -> list[documents.DomainDisk]:
    return documents.domain_disks(DOMAIN)


def request(data: bytes | None) -> tuple[documents.BackupRequest, etree._Element]:
    req = documents.backup_request(data, disks(), SERVER,
                                   lambda t: f"/scratch/{t}.qcow2", lambda host: 10809)
    return req, etree.fromstring(req.backup_xml)


def test_domain_disks_and_what_they_can_hold():
    vda, vdb, sda = disks()
    assert (vda.target, vda.driver, vda.source) == ("vda", "qcow2", "/img/a.qcow2")
    assert vda.bitmap_capable and vda.backup_capable
    assert not vdb.bitmap_capable and vdb.backup_capable
    assert not sda.bitmap_capable and not sda.backup_capable and sda.read_only


def test_mkdir_checkpoint_puts_a_bitmap_where_one_can_be():
    root = etree.fromstring(documents.default_checkpoint("c1", disks()))
    assert root.findtext("name") == "c1"
    assert [(d.get("name"), d.get("checkpoint")) for d in root.iter("disk")] == [
        ("vda", "bitmap"), ("vdb", "no"), ("sda", "no")]


def test_mkdir_backup_is_a_full_pull_of_every_disk_with_vcfs_defaults():
    req, root = request(None)
    assert req.mode == "pull" and req.checkpoint_xml is None
    server = root.find("server")
    assert server.attrib == {"transport": "unix", "socket": "/run/vcfs/lv1-1.sock"}
    listed = {d.get("name"): d for d in root.iter("disk")}
    assert listed["vda"].find("scratch").get("file") == "/scratch/vda.qcow2"
    assert listed["vdb"].find("scratch").get("file") == "/scratch/vdb.qcow2"
    assert listed["sda"].get("backup") == "no" and listed["sda"].find("scratch") is None


def test_the_combined_checkpoint_goes_to_its_own_argument():
    req, root = request(b"<domainbackup mode='pull'><incremental>mon</incremental>"
                        b"<domaincheckpoint><name>tue</name></domaincheckpoint>"
                        b"<disks><disk name='vda'/><disk name='vdb' backup='no'/></disks>"
                        b"</domainbackup>")
    assert root.find("domaincheckpoint") is None and root.findtext("incremental") == "mon"
    assert req.checkpoint == "tue"
    assert etree.fromstring(req.checkpoint_xml).findtext("name") == "tue"
    listed = {d.get("name"): d for d in root.iter("disk")}
    assert listed["vda"].find("scratch") is not None and listed["vdb"].find("scratch") is None


def test_what_the_user_chose_is_kept():
    req, root = request(b"<domainbackup mode='pull'><server name='10.0.0.1'/><disks>"
                        b"<disk name='vda' type='file'><scratch file='/mine.qcow2'/></disk>"
                        b"</disks></domainbackup>")
    assert root.find("server").attrib == {"name": "10.0.0.1", "port": "10809"}  # a free port
    assert [s.get("file") for s in root.iter("scratch")] == ["/mine.qcow2"]
    _, root = request(b"<domainbackup mode='pull'><server transport='unix'/></domainbackup>")
    assert root.find("server").get("socket") == "/run/vcfs/lv1-1.sock"
    remote = documents.backup_request(b"<domainbackup mode='pull'/>", disks(),
                                      {"transport": "tcp", "name": "hv1", "tls": "yes"},
                                      lambda t: f"/s/{t}", lambda host: 10810)
    assert etree.fromstring(remote.backup_xml).find("server").attrib == {
        "transport": "tcp", "name": "hv1", "tls": "yes", "port": "10810"}
    push, root = request(b"<domainbackup><disks><disk name='vda'>"
                         b"<target file='/t.qcow2'/></disk></disks></domainbackup>")
    assert push.mode == "push"  # libvirt's default mode
    assert root.find("disks/disk").get("type") == "file"  # what libvirt's schema wants
    assert root.find("server") is None and root.find(".//scratch") is None


@pytest.mark.parametrize(("data", "error"), [
    (b"<domainbackup><disks></domainbackup>", InvalidInput),
    (b"<domaincheckpoint/>", InvalidInput),
    (b"<domainbackup><domaincheckpoint><name>latest</name></domaincheckpoint></domainbackup>",
     InvalidInput),
    (b"<domainbackup>" + b" " * (1 << 20) + b"</domainbackup>", TooLarge),
    (b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domainbackup>&e;</domainbackup>",
     InvalidInput),
])
def test_bad_backup_documents(data, error):
    with pytest.raises(error):
        request(data)


def test_libvirts_backup_xml_and_checkpoint_xml_are_read():
    server, listed = documents.backup_facts(
        "<domainbackup mode='pull'><incremental>mon</incremental>"
        "<server transport='unix' socket='/s'/><disks>"
        "<disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='mon'"
        " exportname='vda' exportbitmap='backup-vda'><scratch file='/x'/></disk>"
        "<disk name='vdb' backup='no'/></disks></domainbackup>")
    assert server == documents.BackupServer("unix", "/s", None, None, False)
    assert listed == [documents.BackupDisk("vda", "incremental", "mon", "vda", "backup-vda",
                                           "/x")]
    cp = documents.checkpoint_definition(
        "<domaincheckpoint><name>c2</name><parent><name>c1</name></parent>"
        "<creationTime>1700000000</creationTime><disks>"
        "<disk name='vda' checkpoint='bitmap' bitmap='c2' size='65536'/>"
        "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>")
    assert (cp.name, cp.parent, cp.creation_time) == ("c2", "c1", 1700000000)
    assert [(d.name, d.checkpoint, d.size) for d in cp.disks] == [
        ("vda", "bitmap", 65536), ("vdb", "no", None)]


def error(code: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, 10, message, 2, None, None, None, 0, 0)
    return e


@pytest.mark.parametrize(("code", "message", "expected"), [
    # Messages measured from libvirt 9.0.
    (libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: domain moment c1 already exists",
     AlreadyExists),
    (libvirt.VIR_ERR_INVALID_ARG, "invalid argument: store '/x' for backup of 'vda' exists",
     AlreadyExists),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "unsupported configuration: no disk named 'vdz'",
     NotFound),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
     "unsupported configuration: checkpoint for disk vdb unsupported for storage type raw",
     NotSupported),
    (libvirt.VIR_ERR_XML_INVALID_SCHEMA, "XML document failed to validate against schema",
     InvalidInput),
    (libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
     "checkpoint inconsistent: missing or broken bitmap 'cx' for disk 'vda'", InvalidInput),
    (libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
     "Domain checkpoint not found: no domain checkpoint with matching name 'zz'", NotFound),
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, "Timed out during operation: cannot acquire state "
     "change lock (held by monitor=remoteDispatchDomainBackupBegin)", Busy),
    (libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
     "Operation not supported: cannot delete checkpoint for inactive domain", NotSupported),
    (libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not "
     "running", BackendError),
    (libvirt.VIR_ERR_NO_DOMAIN, "Domain not found: no domain with matching uuid 'u'",
     BackendError),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: argument key 'filename' must not have "
     "null value", BackendError),
    (libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot recv data: Connection reset by peer", BackendError),
])
def test_libvirt_errors_map_once(code, message, expected):
    got = translate(error(code, message + "\nsecond line"))
    assert type(got) is expected
    assert str(got) == message + " second line"  # libvirt's own words, on one line
