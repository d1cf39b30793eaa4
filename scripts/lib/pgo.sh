# The steps of a profile-guided build that don't depend on what is built, shared by
# scripts/build-release-proxy and scripts/build-release-floor. Sourced, not run; the callers
# set -euo pipefail.

# Prints the path of llvm-profdata for rustc's own LLVM (rustup's llvm-tools, added when
# missing). $1 names the caller in errors, $2 is the host triple, $3 (optional) is a hint
# appended to the error when llvm-tools can't be added.
pgo_profdata_tool() {
  local who=$1 host=$2 hint=${3:-}
  local tool
  tool="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
  if [[ ! -x $tool ]]; then
    command -v rustup >/dev/null 2>&1 || {
      echo "$who: $tool is missing and there is no rustup to add llvm-tools$hint" >&2
      return 1
    }
    rustup component add llvm-tools >&2
  fi
  printf '%s\n' "$tool"
}

# Merges the raw counts a training run left in $3 into the profile $4 with llvm-profdata ($2);
# written whole or not at all, so an interrupted merge is not taken for a finished one. $1
# names the caller in errors.
pgo_merge() {
  local who=$1 tool=$2 raw_dir=$3 out=$4
  # Without a match the glob stays as written, and names no file.
  local raw=("$raw_dir"/*.profraw)
  [[ -e ${raw[0]} ]] || {
    echo "$who: the training wrote no profile" >&2
    return 1
  }
  "$tool" merge -o "$out.tmp" "${raw[@]}" >&2
  mv "$out.tmp" "$out"
}
