#!/usr/bin/env bash
# Placeholder until the MinkowskiEngine build recipe lands (issue 3).
exit 1
