# The two entry points of the README: `make demo` and `make test`.
# Both first install what is missing (Debian packages, the virtualenv), idempotently.
APT_PACKAGES := qemu-system-x86 qemu-utils fuse3 libfuse3-dev pkg-config python3-dev \
                python3-libnbd libnbd-bin python3-venv gcc rsync patch systemd \
                python3-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
                openssl
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup deps lint clean

demo: setup
	$(VENV)/bin/vcfs demo $(MOUNTPOINT)

test: setup
	$(VENV)/bin/ruff check vcfs tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

setup: deps $(STAMP)

# Only call apt when a package is actually missing: apt-get update is slow and needs the network.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml packaging/pyfuse3-lseek/lseek.patch packaging/pyfuse3-lseek/install
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	packaging/pyfuse3-lseek/install $(PY)
	touch $@

# ruff, then mypy (its settings, strict on vcfs/domain, in pyproject.toml): seconds, before each
# commit.
lint:
	$(VENV)/bin/ruff check vcfs tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) vcfs.egg-info
