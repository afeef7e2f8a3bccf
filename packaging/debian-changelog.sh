#!/bin/sh
# Print debian/changelog for VERSION (upstream-revision): the package's history is the
# project's CHANGELOG.md (installed as /usr/share/doc/authd/changelog.gz).
# The date is the last commit's, so that a rebuild of the same tree is the same package.
set -eu
version=$1
date=$(git log -1 --format=%cD 2>/dev/null || date -R)
cat <<CHANGELOG
authd ($version) unstable; urgency=medium

  * Packaged from the authd source tree; see /usr/share/doc/authd/changelog.gz.

 -- The authd developers <authd-maintainers@lists.example.org>  $date
CHANGELOG
