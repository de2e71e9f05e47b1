#!/bin/sh
# Prototype (issue 22, option a): OpenSSH's sshd as the runner's endpoint, with this as the forced command
# of the gateway's key (authorized_keys command="..."), doing what runner/sshd.py does per channel.
#   sshd_endpoint.sh MODE WORKSPACE TMUX_SOCKET ACTIVITY_FILE
# MODE is rw or ro (one authorized_keys line per mode). The pane's program, onAttach and the session's
# environment come from the runner as files in production; here onAttach is $ORZ_ON_ATTACH if set.
mode=$1 workspace=$2 socket=$3 activity=$4
cd "$workspace" || exit 1
# Activity: the runner reads this file's mtime (attaches) and tmux's #{client_activity} (keystrokes).
: > "$activity"
command=$SSH_ORIGINAL_COMMAND
deny() { printf 'orz: %s\r\n' "$1" >&2; exit 1; }
case $command in
  */sftp-server|internal-sftp)  # a subsystem request: sshd passes the configured command
    [ "$mode" = rw ] || deny "a read-only attach may look, not copy files in or out"
    exec /usr/lib/openssh/sftp-server -d "$workspace" ;;
esac
if [ -z "$command" ] && [ -n "$SSH_TTY" ]; then
  if [ -n "$ORZ_ON_ATTACH" ]; then
    timeout 30 "$SHELL" -c "$ORZ_ON_ATTACH" || printf '[orz] setup.onAttach exited with %s\r\n' $?
  fi
  unset TMUX
  if [ "$mode" = ro ]; then exec tmux -S "$socket" attach-session -r -t main; fi
  exec tmux -S "$socket" attach-session -t main
fi
[ "$mode" = rw ] || deny "a read-only attach only gets the interactive terminal"
if [ -z "$command" ]; then exec "$SHELL" -l; fi
exec "$SHELL" -c "$command"
