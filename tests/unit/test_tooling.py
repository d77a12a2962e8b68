"""The system-tool side of vcfs without a mount: the mount helper's argument translation, the
notify protocol, logging for the journal, `status`/`wait` over a directory tree shaped like a
mount, the manual page and the generated docs.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from vcfs import __version__, client, manpage, notify, treedoc
from vcfs.cli import SUBCOMMANDS, main, parser
from vcfs.logsetup import JournalFormatter
from vcfs.mounthelper import HelperError, helper_argv
from vcfs.mounthelper import is_helper_form as helper_form


def is_helper_form(argv: list[str]) -> bool:
    return helper_form(argv, SUBCOMMANDS)

REPO = Path(__file__).resolve().parents[2]


# --- the mount helper form -------------------------------------------------------------------


def test_helper_form_is_recognized_only_without_a_subcommand():
    assert is_helper_form(["/srv/vms", "/mnt/vms", "-o", "rw"])
    assert is_helper_form(["vcfs#/srv/vms", "/mnt/vms"])
    for argv in (["mount", "/a", "/b"], ["status"], ["--version"], ["-h"], []):
        assert not is_helper_form(argv)


def test_helper_argv_drops_mount_options_and_translates_vcfs_ones():
    # What mount.fuse3 runs for an fstab line with systemd options and a few FUSE ones.
    argv = helper_argv([
        "/srv/vms", "/mnt/vms", "-o",
        "rw,state_dir=/var/lib/x,runtime-dir=/run/x,log_file=/var/log/vcfs.log,cache_images,"
        "debug,allow_other,ro,noexec,nosuid,defaults,auto,noauto,user,nouser,users,_netdev,"
        "nofail,x-systemd.automount,x-systemd.requires=a.service,comment=x,dev,suid,exec",
    ])
    assert argv == [
        "mount", "--state-dir", "/var/lib/x", "--runtime-dir", "/run/x",
        "--log-file", "/var/log/vcfs.log", "--cache-images", "--debug",
        "-o", "allow_other,ro,noexec,nosuid", "--", "/srv/vms", "/mnt/vms",
    ]
    args = parser().parse_args(argv)
    assert (args.command, args.foreground, args.debug) == ("mount", False, True)
    assert (str(args.host), str(args.mountpoint)) == ("/srv/vms", "/mnt/vms")
    assert (str(args.state_dir), args.options) == ("/var/lib/x", ["allow_other,ro,noexec,nosuid"])


def test_scratch_and_shutdown_options_are_mount_and_fstab_options():
    from vcfs.launch import mount_config

    argv = helper_argv(["/srv/vms", "/mnt/vms", "-o",
                        "scratch_dir=/big/scratch,scratch_limit=512,preserve_shutdown"])
    config = mount_config(parser().parse_args(argv))
    assert (config.scratch_dir, config.scratch_limit, config.preserve_shutdown) == (
        Path("/big/scratch"), 512 << 20, True)
    config = mount_config(parser().parse_args(["mount", "/a", "/b"]))
    assert (config.scratch_dir, config.scratch_limit, config.preserve_shutdown) == (
        None, None, False)
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(SystemExit):
            parser().parse_args(["mount", "--scratch-limit", bad, "/a", "/b"])


def test_cbw_timeout_is_a_mount_option_and_an_fstab_option(tmp_path):
    from vcfs.domain.backups.service import CBW_TIMEOUT
    from vcfs.launch import mount_config

    argv = helper_argv(["/srv/vms", "/mnt/vms", "-o", "cbw_timeout=2,allow_other"])
    assert argv[:3] == ["mount", "--cbw-timeout", "2"]
    assert mount_config(parser().parse_args(argv)).cbw_timeout == 2
    # the command line's default is the engine's (cli.py does not import the engine)
    assert mount_config(parser().parse_args(["mount", "/a", "/b"])).cbw_timeout == CBW_TIMEOUT
    for bad in ("0", "601", "1.5", "x"):
        with pytest.raises(SystemExit):
            parser().parse_args(["mount", "--cbw-timeout", bad, "/a", "/b"])


def test_helper_argv_accepts_the_legacy_source_and_several_o_flags():
    assert helper_argv(["vcfs#/srv/vms", "/mnt", "-o", "rw", "-o", "ro", "-n", "-v"]) == [
        "mount", "-o", "ro", "--", "/srv/vms", "/mnt"]
    assert helper_argv(["/srv", "/mnt", "-f"]) == ["mount", "-f", "--", "/srv", "/mnt"]
    # A source that looks like an option after translation stays a source.
    # HOST stays a string (it may be a libvirt URI); mount_config makes a directory a Path.
    assert parser().parse_args(helper_argv(["./-x", "/mnt"])).host == "./-x"


@pytest.mark.parametrize(("argv", "words"), [
    (["/srv"], "mountpoint"),
    (["/srv", "/mnt", "-o", "state_dir"], "state_dir needs a value"),
    (["/srv", "/mnt", "-o", "log_file="], "log_file needs a value"),
    (["/srv", "/mnt", "--bogus"], "--bogus"),
])
def test_helper_argv_errors_are_one_line_errors(argv, words):
    with pytest.raises(HelperError, match=re.escape(words)):
        helper_argv(argv)


def test_helper_form_start_error_is_one_line(tmp_path, capsys):
    (tmp_path / "mnt").mkdir()
    assert main([str(tmp_path / "nohost"), str(tmp_path / "mnt"), "-o", "rw,dev,suid"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"vcfs: {tmp_path / 'nohost'}: no such host directory\n")


def test_commands_other_than_mount_do_not_import_the_mount_machinery():
    # Layer rule (only vcfs/fs imports pyfuse3) and start-up time: status, wait and the
    # manual page read files like a user; they need neither pyfuse3 nor trio.
    code = ("import sys, vcfs.cli, vcfs.client, vcfs.manpage, vcfs.notify; "
            "vcfs.manpage.render(vcfs.cli.parser()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyfuse3', 'trio')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "[]\n"), r.stderr


# --- notify ----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(request, tmp_path, monkeypatch):
    """A bound datagram socket named in $NOTIFY_SOCKET (a path, or abstract with '@')."""
    if getattr(request, "param", "path") == "abstract":
        name = f"@vcfs-test-{uuid.uuid4().hex}"
        address = "\0" + name[1:]
    else:
        name = address = f"/tmp/vcfs-test-{uuid.uuid4().hex[:8]}.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    yield s
    s.close()
    if not name.startswith("@"):
        os.unlink(name)


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_ready_and_stopping_are_datagrams_to_notify_socket(notify_socket):
    assert notify.ready("serving /a on /b")
    assert notify_socket.recv(4096).decode().splitlines() == [
        "READY=1", "STATUS=serving /a on /b", f"MAINPID={os.getpid()}"]
    assert notify.stopping("unmounting\n/b")
    assert notify_socket.recv(4096).decode().splitlines() == [
        "STOPPING=1", "STATUS=unmounting /b"]


def test_notify_without_a_manager_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.ready("x")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not notify.ready("x")
    assert notify.socket_address("@abc") == "\0abc"
    assert notify.socket_address("/run/x") == "/run/x"
    assert notify.socket_address("") is None


def test_a_vanished_manager_is_a_warning_not_a_failure(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", f"/tmp/vcfs-nobody-{uuid.uuid4().hex[:8]}")
    with caplog.at_level(logging.WARNING):
        assert not notify.stopping("x")
    assert "cannot notify the service manager" in caplog.text


# --- logging ---------------------------------------------------------------------------------


def test_journal_lines_carry_a_priority_and_no_timestamp():
    fmt = JournalFormatter()
    for level, prefix in ((logging.INFO, "<6>INFO"), (logging.WARNING, "<4>WARNING"),
                          (logging.ERROR, "<3>ERROR"), (logging.DEBUG, "<7>DEBUG")):
        record = logging.LogRecord("vcfs.x", level, __file__, 1, "domain %s: %s", ("vm1", "y"),
                                   None)
        assert fmt.format(record) == f"{prefix} vcfs.x: domain vm1: y"


@pytest.mark.parametrize("journal", [True, False])
def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path, journal):
    log = tmp_path / "stderr"
    code = ("import logging; from vcfs.logsetup import setup_logging; setup_logging(False, None); "
            "logging.getLogger('vcfs.t').info('hello')")
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        stream = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
        subprocess.run([sys.executable, "-c", code], stderr=f, timeout=30, check=True,
                       env={**os.environ, "JOURNAL_STREAM": stream})
    text = log.read_text()
    if journal:
        assert text == "<6>INFO vcfs.t: hello\n"
    else:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ INFO vcfs\.t: hello\n", text), text


# --- status files and formatting -------------------------------------------------------------


def test_human_sizes_durations_and_bars():
    assert [client.human(n) for n in (0, 1023, 1536, 64 << 20, 3 << 40)] == [
        "0 B", "1023 B", "1.5 KiB", "64.0 MiB", "3.0 TiB"]
    assert [client.duration(s) for s in (0, 59.6, 75, 3675)] == ["0:00", "1:00", "1:15", "1:01:15"]
    assert client.bar(1, 4, width=8) == "[##------]"
    assert client.bar(5, 4, width=4) == "[####]" and client.bar(1, 0, width=2) == "[--]"
    assert client.percent(1, 3) == " 33%" and client.percent(0, 0) == "  -%"


def test_rate_is_averaged_over_a_window():
    rate = client.Rate()
    assert rate.add(0.0, 0) is None
    assert rate.add(1.0, 100) == 100
    assert rate.add(2.0, 300) == 150
    for t in range(3, 20):
        r = rate.add(float(t), 300 + (t - 2) * 50)
    assert r == 50  # old samples have left the window


def test_vcfs_mounts_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "90 22 0:50 / /mnt/vms rw,nosuid,nodev shared:1 - fuse.vcfs vcfs rw,user_id=0\n"
        "91 22 0:51 / /mnt/my\\040vms rw - fuse.vcfs vcfs rw\n"
        "92 22 0:52 / /mnt/other rw - fuse.sshfs x rw\n"
    )
    assert client.vcfs_mounts(str(info)) == [Path("/mnt/vms"), Path("/mnt/my vms")]


# --- status and wait over a mount-shaped tree ----------------------------------------------------


def fake_mount(root: Path) -> Path:
    """A directory tree shaped like a vcfs mount: vm1 with checkpoints and two jobs."""
    dom = root / "vm1"
    cps = dom / "checkpoints"
    for name in ("mon", "tue"):
        (cps / name).mkdir(parents=True)
        (cps / name / "xml").write_text("<domaincheckpoint/>")
    (cps / "tue" / "xml").write_text("<domaincheckpoint><!-- broken: bitmap missing -->")
    (cps / "new").write_text("")
    os.symlink("tue", cps / "current")
    backups = dom / "backups"
    for job, text in (("2", "state: running\nmode: pull\ndisk vda: 1048576/4194304\n"
                            "nbd-read: 2097152\n"),
                      ("10", "state: failed\nmode: push\ndisk vda: 0/4194304\n"
                             "error: disk vda: boom\n")):
        (backups / job / "disks").mkdir(parents=True)
        (backups / job / "status").write_text(text)
    (backups / "new").write_text("")
    os.symlink("10", backups / "latest")
    (root / "vm2" / "checkpoints").mkdir(parents=True)
    (root / "vm2" / "backups").mkdir()
    return root


def test_status_lists_domains_checkpoints_and_jobs(tmp_path):
    root = fake_mount(tmp_path / "mnt")
    out, err = io.StringIO(), io.StringIO()
    assert client.status(root, out=out, err=err) == 0
    assert out.getvalue() == (
        "vm1\n"
        "  checkpoints: mon, tue (current, broken)\n"
        "  backup 2: pull, running (2.0 MiB fetched over NBD)\n"
        "    vda  1.0 MiB / 4.0 MiB   25%\n"
        "  backup 10: push, failed: disk vda: boom\n"
        "    vda  0 B / 4.0 MiB    0%\n"
        "vm2\n"
        "  checkpoints: none\n"
        "  backups: none\n"
    )
    # One domain's directory narrows it down.
    out = io.StringIO()
    assert client.status(root / "vm2", out=out, err=err) == 0
    assert out.getvalue().startswith("vm2\n")


def test_status_of_every_mount_lists_the_readable_ones(tmp_path, monkeypatch):
    root = fake_mount(tmp_path / "mnt")
    monkeypatch.setattr(client, "vcfs_mounts", lambda: [tmp_path / "gone", root])
    out, err = io.StringIO(), io.StringIO()
    assert client.status(None, out=out, err=err) == 1
    assert err.getvalue() == f"vcfs: {tmp_path / 'gone'}: No such file or directory\n"
    assert out.getvalue().startswith(f"{root}:\nvm1\n  checkpoints: mon, tue")


def test_status_passes_by_a_mount_that_does_not_answer(tmp_path, monkeypatch):
    root = fake_mount(tmp_path / "mnt")
    hung = tmp_path / "hung"
    release = threading.Event()
    listed = client.domain_dirs

    def domain_dirs(path: Path) -> list[Path]:
        if path == hung:
            release.wait()  # a FUSE server that never answers
        return listed(path)

    monkeypatch.setattr(client, "domain_dirs", domain_dirs)
    monkeypatch.setattr(client, "vcfs_mounts", lambda: [hung, root])
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    try:
        assert client.status(None, out=out, err=err, deadline=0.2) == 1
    finally:
        release.set()
    assert time.monotonic() - started < 2
    assert err.getvalue() == f"vcfs: {hung}: no answer in 0.2 s (passed by)\n"
    assert out.getvalue().startswith(f"{root}:\nvm1\n  checkpoints: mon, tue")


def test_status_of_something_else_is_one_line(tmp_path):
    err = io.StringIO()
    assert client.status(tmp_path, out=io.StringIO(), err=err) == 1
    assert err.getvalue() == f"vcfs: {tmp_path}: not a vcfs mount or domain directory\n"
    err = io.StringIO()
    assert client.status(tmp_path / "nope", out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith(f"vcfs: {tmp_path / 'nope'}: ")


def write_whole(path: Path, text: str) -> None:
    """Replace a file at once, as a status file read through vcfs is rendered whole."""
    path.with_suffix(".new").write_text(text)
    os.replace(path.with_suffix(".new"), path)


def later(delay: float, fn) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn()))
    t.start()
    return t


def test_wait_returns_0_on_completion_and_1_with_the_error_on_failure(tmp_path):
    root = fake_mount(tmp_path / "mnt")
    job = root / "vm1/backups/2"
    t = later(0.2, lambda: write_whole(job / "status", "state: completed\nmode: pull\n"))
    err = io.StringIO()
    started = time.monotonic()
    assert client.wait(root / "vm1/backups/2", interval=0.02, err=err) == 0
    assert time.monotonic() - started >= 0.2
    t.join()
    assert err.getvalue() == ""
    # `latest` resolves to job 10, which failed.
    assert client.wait(root / "vm1/backups/latest", interval=0.02, err=err) == 1
    assert err.getvalue() == "vcfs: backup 10 of vm1 failed: disk vda: boom\n"


def test_wait_returns_1_when_the_job_goes_away_and_2_for_non_backups(tmp_path):
    root = fake_mount(tmp_path / "mnt")
    job = root / "vm1/backups/2"
    t = later(0.1, lambda: shutil.rmtree(job))
    err = io.StringIO()
    assert client.wait(job, interval=0.02, err=err) == 1
    t.join()
    assert err.getvalue() == "vcfs: backup 2 of vm1 was removed before it finished\n"
    for path in (root / "vm1/checkpoints/mon", root / "vm1", root / "vm1/backups/99",
                 root / "vm1/backups/new"):
        err = io.StringIO()
        assert client.wait(path, err=err) == 2, path
        assert err.getvalue().startswith(f"vcfs: {path}: not a backup job directory"), path


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_watch_redraws_running_jobs_until_none_runs(tmp_path, tty):
    root = fake_mount(tmp_path / "mnt")
    status = root / "vm1/backups/2/status"
    steps = [1, 2, 3]

    def advance() -> None:
        for mib in steps:
            time.sleep(0.1)
            done = (mib + 1) << 20
            write_whole(status, f"state: running\nmode: pull\ndisk vda: {done}/4194304\n")
        time.sleep(0.1)
        write_whole(status, "state: completed\nmode: pull\ndisk vda: 4194304/4194304\n")

    out = Tty() if tty else io.StringIO()
    t = later(0, advance)
    assert client.Watcher([root], out, interval=0.03).run() == 0
    t.join()
    text = out.getvalue()
    lines = [line for line in re.split(r"\n|\x1b\[\d+F\x1b\[J", text) if line]
    assert lines[-1].startswith("vm1 backup 2: completed after "), text
    bars = [line for line in lines if line.startswith("vm1 backup 2 (pull) vda [")]
    assert len(bars) >= 4, text
    assert "[######------------------]  25%  1.0 MiB/4.0 MiB" in bars[0]
    assert any(re.search(r"  [\d.]+ MiB/s  \d+:\d\d left$", line) for line in bars), text
    # On a terminal each redraw replaces the previous one: cursor up one line, clear.
    assert ("\x1b[1F\x1b[J" in text) == tty


def test_watch_with_nothing_running_says_so(tmp_path):
    root = fake_mount(tmp_path / "mnt")
    (root / "vm1/backups/2/status").write_text("state: completed\nmode: pull\n")
    out = io.StringIO()
    assert client.Watcher([root], out, interval=0.01).run() == 0
    assert out.getvalue() == "no backup job is running\n"


# --- the manual page and the generated docs ----------------------------------------------------


def all_options() -> dict[str, list[str]]:
    """Option strings and positional metavars of the parser and of every subcommand."""
    import argparse

    p = parser()
    found = {"": [s for a in p._actions for s in a.option_strings]}
    for name, _, sp in manpage.subcommands(p):
        found[name] = [s for a in sp._actions if not isinstance(a, argparse._HelpAction)
                       for s in (a.option_strings or [a.metavar or a.dest])]
    return found


def test_man_page_has_the_sections_and_every_subcommand_and_option():
    page = manpage.render(parser())
    assert page.startswith(f'.TH VCFS 1 "" "vcfs {__version__}" "User Commands"\n.SH NAME\n')
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS",
                    '"MOUNT HELPER AND FSTAB"', "SERVICE", "FILES", "ERRORS", '"EXIT STATUS"',
                    "ENVIRONMENT", "EXAMPLES", '"SEE ALSO"'):
        assert f"\n.SH {section}\n" in page, section
    plain = page.replace("\\-", "-")
    subs = all_options()
    assert set(subs) == {"", "mount", "umount", "status", "wait", "man", "demo"}
    for name, options in subs.items():
        if name:
            assert f".SS \\fBvcfs {name}\\fR" in plain, name
        for option in options:
            assert option in plain, (name, option)
    # Every path of the tree, in the FILES section.
    for entry in treedoc.TREE:
        assert f"\\fB{manpage.roff(entry.path, code=True)}\\fR" in page
    # Well-formed roff: every line a request, text, or a continuation; no raw non-ASCII.
    assert all(ord(c) < 128 for c in page)
    assert not re.search(r"^[.'](?!\\\"|[A-Z]{1,2}\b|br\b|nf\b|fi\b)", page, re.M)


def test_man_page_lists_every_option_of_the_mount_helper():
    # From mounthelper's tables: tls_x509_dir= and image_cache= were once missing from the page.
    from vcfs import mounthelper

    text = re.sub(r"\\f[BIR]", "", manpage.render(parser())).replace("\\-", "-")
    helper = text[text.index(".SH \"MOUNT HELPER AND FSTAB\""):text.index(".SH SERVICE")]
    for key in [*mounthelper.VALUE_OPTIONS, *mounthelper.FLAG_OPTIONS, *mounthelper.MOUNT_ONLY]:
        assert re.search(rf"\b{key}\b", helper), key
    assert "image_cache=MIB" in helper and "tls_x509_dir=DIR" in helper
    assert "cbw_timeout=SECONDS" in helper


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_page_formats_without_warnings():
    page = manpage.render(parser())
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, text=True,
                       capture_output=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, "")
    if shutil.which("man"):
        r = subprocess.run(["man", "-l", "-"], input=page, text=True, capture_output=True,
                           env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"},
                           timeout=30)
        assert r.returncode == 0, r.stderr
        text = re.sub(r".\x08", "", r.stdout)
        for needle in ("vcfs status [MOUNTPOINT] [-w] [--interval SECONDS]",
                       "vcfs wait BACKUP", "<dom>/backups/<id>/disks/<disk>.qcow2",
                       "vcfs HOST MOUNTPOINT [-o OPTIONS]"):
            assert needle in text, needle


def test_vcfs_man_prints_the_page_when_not_on_a_terminal():
    r = subprocess.run([sys.executable, "-m", "vcfs", "man"], capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout) == (0, manpage.render(parser()))
    r = subprocess.run([sys.executable, "-m", "vcfs.manpage"], capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout) == (0, manpage.render(parser()))


def test_generated_files_are_current():
    # Regenerate with: python -m vcfs.manpage > packaging/vcfs.1
    #                  python -m vcfs.manpage --tree-md > docs/tree.md
    assert (REPO / "packaging/vcfs.1").read_text() == manpage.render(parser())
    assert (REPO / "docs/tree.md").read_text() == treedoc.tree_markdown()


def test_man_page_does_not_depend_on_who_renders_it(monkeypatch):
    page = manpage.render(parser())
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.local/share")
    assert manpage.render(parser()) == page


def test_pyproject_installs_the_man_page_and_the_console_script():
    text = (REPO / "pyproject.toml").read_text()
    assert 'vcfs = "vcfs.cli:main"' in text
    assert '"share/man/man1" = ["packaging/vcfs.1"]' in text


def test_tree_modes_match_the_node_kinds():
    # The same rules as vcfs.tree.nodes: dirs 0755, rendered files 0444, control files 0200,
    # images 0400, links 0777 (checked against a real mount in tests/integration).
    for e in treedoc.TREE:
        assert e.path.endswith("/") == (e.kind == treedoc.DIR), e.path
        assert e.mode in {treedoc.DIR: {0o755}, treedoc.LINK: {0o777},
                          treedoc.FILE: {0o444, 0o200, 0o400}}[e.kind], e.path
        assert (e.mode == 0o200) == bool(e.write and e.kind == treedoc.FILE), e.path


def test_wheel_holds_the_console_script_and_the_man_page(tmp_path):
    # What `pip install .` installs, built from a copy so the checkout gets no build/ dir.
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp_path / "dist").glob("vcfs-*.whl")
    import zipfile

    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        entry_points = z.read(f"vcfs-{__version__}.dist-info/entry_points.txt").decode()
        man = z.read(f"vcfs-{__version__}.data/data/share/man/man1/vcfs.1").decode()
    assert "[console_scripts]\nvcfs = vcfs.cli:main" in entry_points
    assert man == manpage.render(parser())
    assert {"vcfs/cli.py", "vcfs/client.py", "vcfs/notify.py", "vcfs/manpage/__init__.py",
            "vcfs/manpage/__main__.py", "vcfs/treedoc.py"} <= names
