#!/usr/bin/env bash
# Runs (or resumes) the pre-registered MetaWorld confirmation study from its registered commit (the one that
# added this folder's README.md); see ../run_registered.sh.
#   bash docs/results/metaworld_confirm/run.sh [study key=value ...]   e.g. report_only=true
exec bash "$(dirname "$0")/../run_registered.sh" metaworld_confirm "$@"
