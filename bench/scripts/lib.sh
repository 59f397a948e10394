# shellcheck shell=bash
# Shared by the bench scripts (source it; it defines functions only).

# Exits 2 naming the build command when any of the given binaries is missing.
need_bins() {
    local bin
    for bin in "$@"; do
        [[ -x $bin ]] || { echo "missing $bin: cargo build --release -p tessera-broker -p tessera-bench" >&2; exit 2; }
    done
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for something to listen on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}
