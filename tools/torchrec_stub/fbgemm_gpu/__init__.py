"""Stand-in package; see tools/torchrec_stub/_stubpkg.py."""

from _stubpkg import install

install(__name__, globals())
