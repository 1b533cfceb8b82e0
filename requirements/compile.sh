#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the complete resolved environment (every direct and transitive
# package at an exact version, with the sha256 of every file PyPI serves for it), from setup.cfg's
# install_requires and its [test] and [ssl] extras. Resolved for the supported platform: Linux x86_64, Python 3.11.
#
#     bash requirements/compile.sh                                # keep every pin, add what setup.cfg added
#     bash requirements/compile.sh --upgrade-package speechbrain  # a deliberate upgrade of one package
#     bash requirements/compile.sh --upgrade                      # a deliberate upgrade of everything
#
# Existing pins are kept unless an upgrade is asked for. After any change, run the README's test
# command from a fresh clone and commit the lock with what it upgraded and why.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q pip-tools==7.6.2
# --allow-unsafe pins setuptools and wheel too: the project's editable install builds with them
# (--no-build-isolation), so a fresh install takes nothing unhashed from the index.
"$tools/bin/pip-compile" --quiet --extra test --extra ssl --strip-extras --allow-unsafe --generate-hashes \
    --no-emit-index-url --no-emit-find-links --output-file requirements/lock.txt "$@" setup.cfg
