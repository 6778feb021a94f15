# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_lockctl_global_optspecs
    string join \n socket= h/help V/version
end

function __fish_lockctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_lockctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_lockctl_using_subcommand
    set -l cmd (__fish_lockctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c lockctl -n "__fish_lockctl_needs_command" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_needs_command" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_needs_command" -s V -l version -d 'Print version'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "run" -d 'Hold a lock while a command runs (flock(1)\'s options and shapes work too)'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "acquire" -d 'Take a detached lease and print its ticket and fence'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "renew" -d 'Extend a lease by its ticket'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "release" -d 'Release a lease by its ticket (a lease of your uid; root and admins: any)'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "describe" -d 'Who holds a lock and who waits for it (never tickets)'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "list" -d 'Locks that have holders or waiters'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "force-release" -d 'End every hold on a lock (root or a configured admin); holders are told they lost it'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "watch" -d 'Print one line per event on a lock until interrupted'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "stats" -d 'Counters, gauges and latency distributions'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "metrics" -d 'Print the daemon\'s statistics in Prometheus text format (lockd_ prefix)'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "completions" -d 'Print a shell completion script'
complete -c lockctl -n "__fish_lockctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s w -l wait -l timeout -d 'Wait at most this long: seconds (fractions too), or 500ms, 30s, 5m, 1h [default: wait as long as it takes]' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s E -l conflict-exit-code -d 'Exit code when the lock is not acquired (conflict or timeout)' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s c -l command -d 'Run STRING through `sh -c` instead of CMD (flock\'s -c)' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l namespace -d 'Lock namespace' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l lease -d 'Hold with a lease of this length, renewed in the background while the command runs (bounds how long a hung lockctl can keep the lock)' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l kill-after -d 'After the hold is lost, how long the command gets between SIGTERM and SIGKILL' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l permits -d 'Make the lock a counting semaphore: at most N holders at once (exclusive holds only)' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l lock-delay -d 'If this hold ends without a release (lockctl and the command gone, lease expired, force-release), nobody gets the lock for this long afterwards' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s x -s e -l exclusive -d 'Take an exclusive hold (the default)'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s s -l shared -d 'Take a shared hold instead of an exclusive one'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s n -l nonblock -l nb -l nonblocking -d 'Fail at once if the lock is held [default: wait as long as it takes]'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s o -l close -d 'Do not pass the lock\'s descriptor to the command (for commands that start long-lived daemons): if lockctl dies, the lock is released at once, even while the command runs'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s F -l no-fork -d 'Run the command in lockctl\'s place (exec, no fork): it holds the lock for as long as it (and whatever inherits LOCKD_FD) lives; nothing supervises it; not with --lease'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s u -l unlock -d 'Not supported: the lock is released when the command exits (for a lock that outlives lockctl, use `lockctl acquire --lease` and `lockctl release TICKET`)'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -l verbose -d 'Print to stderr whom lockctl waits for and how long it waited'
complete -c lockctl -n "__fish_lockctl_using_subcommand run" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l lease -d 'Lease length: 500ms, 30s, 5m, 1h' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -s w -l wait -l timeout -d 'Wait at most this long: seconds (fractions too), or 500ms, 30s, 5m, 1h [default: wait as long as it takes]' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l permits -d 'Make the lock a counting semaphore: at most N holders at once (exclusive holds only)' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l lock-delay -d 'If the lease ends without a release (expired, force-released), nobody gets the lock for this long afterwards' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l data -d 'Text attached to the lease, shown by describe (at most 1 KiB)' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l namespace -d 'Lock namespace' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l detach -d 'Keep the lease after lockctl exits (always the case; accepted for clarity)'
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -s n -l nonblock -l nb -l nonblocking -d 'Fail at once if the lock is held [default: wait as long as it takes]'
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -s s -l shared -d 'Take a shared lease'
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand acquire" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand renew" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand renew" -l lease -d 'New lease length from now [default: the lease\'s own length]' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand renew" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand renew" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand release" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand release" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand describe" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand describe" -l namespace -d 'Lock namespace' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand describe" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand describe" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand list" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand list" -l namespace -d 'Only this namespace [default: every namespace you may use]' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand list" -l prefix -d 'Only names starting with this' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand list" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand list" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand force-release" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand force-release" -l namespace -d 'Lock namespace' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand force-release" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand force-release" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand watch" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand watch" -l namespace -d 'Lock namespace' -r
complete -c lockctl -n "__fish_lockctl_using_subcommand watch" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand watch" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand stats" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand stats" -l json -d 'Print JSON'
complete -c lockctl -n "__fish_lockctl_using_subcommand stats" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand metrics" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand metrics" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand completions" -l socket -d 'lockd\'s socket [default: $LOCKD_SOCKET, else the daemon\'s default path]' -r -F
complete -c lockctl -n "__fish_lockctl_using_subcommand completions" -s h -l help -d 'Print help'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "run" -d 'Hold a lock while a command runs (flock(1)\'s options and shapes work too)'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "acquire" -d 'Take a detached lease and print its ticket and fence'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "renew" -d 'Extend a lease by its ticket'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "release" -d 'Release a lease by its ticket (a lease of your uid; root and admins: any)'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "describe" -d 'Who holds a lock and who waits for it (never tickets)'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "list" -d 'Locks that have holders or waiters'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "force-release" -d 'End every hold on a lock (root or a configured admin); holders are told they lost it'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "watch" -d 'Print one line per event on a lock until interrupted'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "stats" -d 'Counters, gauges and latency distributions'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "metrics" -d 'Print the daemon\'s statistics in Prometheus text format (lockd_ prefix)'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "completions" -d 'Print a shell completion script'
complete -c lockctl -n "__fish_lockctl_using_subcommand help; and not __fish_seen_subcommand_from run acquire renew release describe list force-release watch stats metrics completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
