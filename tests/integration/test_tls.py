"""Pull backups over TLS: `<server tls='yes'>` with x509 credentials given at mount time."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import errors_of, listing, write_errno
from tests.vm import DiskSpec

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
    reason="openssl is needed to make the test certificates",
)


def make_certificates(d: Path) -> None:
    """A CA, a server certificate for localhost and a client certificate, as QEMU and libnbd
    expect them in one directory."""
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vcfs test CA",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", f"{role}-key.pem", "-out", f"{role}.csr")
        ext = d / f"{role}.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage={usage}\n"
                       "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-out", f"{role}-cert.pem", "-extfile", ext.name)
    for key in d.glob("*-key.pem"):
        os.chmod(key, 0o600)


@pytest.mark.parametrize("server", [
    "<server transport='tcp' name='localhost' tls='yes'/>",
    "<server transport='unix' socket='{sock}' tls='yes'/>",
])
def test_pull_backup_over_tls(vm_factory, vcfs_mount, tmp_path, server):
    vm = vm_factory("vm1", [DiskSpec("vda", size=16 << 20)])
    vm.write("vda", 0, 1 << 20, 0x7E)
    certs = tmp_path / "pki"
    make_certificates(certs)
    mnt = vcfs_mount(vm.host_dir, "--tls-x509-dir", str(certs))
    dom = mnt.path / "vm1"
    doc = ("<domainbackup mode='pull'>" + server.format(sock=tmp_path / "tls.sock")
           + "</domainbackup>")
    assert write_errno(dom / "backups/new", doc.encode()) == 0, errors_of(dom)
    assert "tls='yes'" in (dom / "backups/1/xml").read_text()
    with open(dom / "backups/1/disks/vda", "rb") as f:
        assert f.read(1 << 20) == b"\x7e" * (1 << 20)
    # A client without a certificate is refused by QEMU.
    xml = (dom / "backups/1/xml").read_text()
    if "tcp" in server:
        port = re.search(r"port='(\d+)'", xml)[1]
        uri = f"nbd://localhost:{port}/vda"
    else:
        uri = f"nbd+unix:///vda?socket={tmp_path / 'tls.sock'}"
    r = subprocess.run(["nbdinfo", uri], capture_output=True, text=True)
    assert r.returncode != 0
    os.rmdir(dom / "backups/1")
    assert vm.qmp("query-jobs") == []
    assert [o for o in vm.qmp("qom-list", path="/objects") if "tls" in o["name"]] == []


def test_tls_without_credentials_is_refused(vm_factory, vcfs_mount):
    vm = vm_factory("vm1", [DiskSpec("vda", size=16 << 20)])
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    doc = b"<domainbackup mode='pull'><server transport='tcp' name='localhost' tls='yes'/>" \
          b"</domainbackup>"
    assert write_errno(dom / "backups/new", doc) == errno.EOPNOTSUPP
    assert "--tls-x509-dir" in errors_of(dom)[-1]
    assert listing(dom / "backups") == ["new"]
