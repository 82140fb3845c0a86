# Sourced by the GPU-machine scripts that need only the TT convolution (bench/gpu_conv_session.sh,
# bench/gpu_conv_round.sh), from the repository root: puts the repository on PYTHONPATH and, when
# torchrec is not importable (no staged stack), the stand-ins of tools/torchrec_stub (see
# _stubpkg.py: the embedding side does not work with them). import_ok imports torchrec_tt,
# stubbing any further missing package while stubbing is on.
STUB=$PWD/tools/torchrec_stub
python3 -c "import torchrec" 2>/dev/null || export PYTHONPATH=$STUB${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

import_ok() {  # imports torchrec_tt, stubbing missing packages when stubbing is on
  local err mod
  for _ in 1 2 3 4 5 6; do
    err=$(python3 -c "import torchrec_tt, torch; torch.ops.torchrec_tt.tt_conv2d" 2>&1) && return 0
    mod=$(printf '%s' "$err" | grep -oP "No module named '\K[^'.]+" | head -1)
    if [ -n "$mod" ] && [ "${PYTHONPATH#*torchrec_stub}" != "$PYTHONPATH" ] && [ "$mod" != torchrec_tt ]; then
      mkdir -p "$STUB/$mod"
      printf 'from _stubpkg import install\n\ninstall(__name__, globals())\n' > "$STUB/$mod/__init__.py"
      echo "stubbed missing package: $mod"
    else
      printf '%s\n' "$err" | tail -4
      return 1
    fi
  done
  return 1
}
