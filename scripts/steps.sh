# Sourced by scripts/reproduce*.sh and the step-student scripts: a resumable step runner over the run folder $R.
step() {  # step NAME CMD...: run CMD once (RUNS/NAME.done marks it finished), record its time in RUNS/times.txt
  local name=$1; shift
  if [ ! -e "$R/$name.done" ]; then
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0)) s: $*" >> "$R/times.txt"
    touch "$R/$name.done"
  fi
}
to_file() {  # to_file FILE CMD...: CMD's output into FILE, whole or not at all (written aside, then renamed)
  local file=$1; shift
  "$@" > "$file.tmp" && mv "$file.tmp" "$file"
}
sitting() {  # sitting OUT INIT STEPS LR [OPTIONS...]: PARE on a 4-step student, one sitting of segment regression on
  # the teacher $T's trajectories in $RUNS/data and data2 (the objects weighed over the background), from INIT
  : "${T:?sitting needs T, the teacher}" "${RUNS:?sitting needs RUNS, the folder of the teacher data}"
  local out=$1 init=$2 steps=$3 lr=$4
  shift 4
  pare step-distill --teacher "$T" --data "$RUNS/data" --more-data "$RUNS/data2" --steps 4 --train-steps "$steps" \
    --batch-size 32 --lr "$lr" --warmup-steps 20 --checkpoint-every 50 --salience-weight 1 --init-from "$init" \
    --out "$out" "$@"
}
