#!/bin/bash
# One rank (or one launcher of ranks) started by transfer.sbatch: `rank.sh COMMAND ARGS...`.
# USR1 is ignored here and so in COMMAND, which inherits that, until the run installs its own handler (checkpoint and
# stop): USR1 sent to every process of the job step neither ends a rank still starting nor a helper (torchrun's agent,
# a sandbox). A rank that checkpointed and stopped (exit 75) leaves $STOPPED_FILE for the batch script.
trap '' USR1
"$@"
status=$?
if (( status == 75 )) && [[ -n "${STOPPED_FILE:-}" ]]; then
    touch "$STOPPED_FILE"
fi
exit "$status"
