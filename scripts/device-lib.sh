# Sourced by the device scripts (scripts/device-*.sh): what they share.
#
# step NAME TIMEOUT COMMAND...: runs COMMAND under `timeout`, its output in
# $L/NAME.log, and appends "== NAME: exit RC in N s" to $S. The caller sets
# L (the log folder) and S (the summary file).
step() {
  local n=$1 t=$2
  shift 2
  local s=$SECONDS
  timeout "$t" "$@" > "$L/$n.log" 2>&1
  local rc=$?
  echo "== $n: exit $rc in $((SECONDS - s)) s" >> "$S"
}
