# Sourced by scripts/reproduce*.sh: a resumable step runner over the run folder $R.
step() {  # step NAME CMD...: run CMD once (RUNS/NAME.done marks it finished), record its time in RUNS/times.txt
  local name=$1; shift
  if [ ! -e "$R/$name.done" ]; then
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0)) s: $*" >> "$R/times.txt"
    touch "$R/$name.done"
  fi
}
