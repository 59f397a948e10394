#!/usr/bin/env bash
# Applies a Tessera kernel-tuning profile: shows, for every sysctl, the running
# value, the profile's value and what will change, then sets the changed ones
# with `sysctl -w` and writes the persistent files:
#   /etc/sysctl.d/90-tessera-PROFILE.conf      (the merged values, read at boot)
#   /etc/security/limits.d/90-tessera.conf     (nofile and memlock for logins)
#
# Usage: apply.sh PROFILE [--dry-run] [--root DIR]
#   PROFILE     standard | aggressive | maximum (see README.md)
#   --dry-run   print the comparison and the file changes; change nothing
#   --root DIR  work on DIR/proc/sys and DIR/etc instead of the live system,
#               writing the sysctl files directly (never calls sysctl); for tests
#               and for preparing an image. Needs no root.
#
# Safe to run twice: a value that already meets the profile is kept, including
# one beyond it (a higher fs.file-max is never lowered); the second run changes
# nothing. Each setting's comparison rule (at-least, at-most, exact, per field)
# comes from profiles/checks.conf, the same file `brokerctl tune check` uses.
#
# Exit codes: 0 done (or dry run), 1 a change failed or not root,
# 2 usage error (unknown profile, bad option).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
profiles_dir=$here/profiles
known_profiles=(standard aggressive maximum)

usage() {
    cat <<'EOF'
Usage: apply.sh PROFILE [--dry-run] [--root DIR]
  PROFILE     standard | aggressive | maximum (see README.md)
  --dry-run   print the comparison and the file changes; change nothing
  --root DIR  work on DIR/proc/sys and DIR/etc instead of the live system
EOF
}

usage_error() {
    printf 'apply.sh: %s\n' "$1" >&2
    usage >&2
    exit 2
}

profile=""
dry_run=0
root=""
while (($#)); do
    case $1 in
    --dry-run) dry_run=1 ;;
    --root)
        (($# >= 2)) || usage_error "--root needs a directory"
        root=$2
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    -*) usage_error "unknown option '$1'" ;;
    *)
        [[ -z $profile ]] || usage_error "one profile only (got '$profile' and '$1')"
        profile=$1
        ;;
    esac
    shift
done
[[ -n $profile ]] || usage_error "no profile given"
case " ${known_profiles[*]} " in
*" $profile "*) ;;
*) usage_error "unknown profile '$profile' (known: ${known_profiles[*]})" ;;
esac
if [[ -n $root ]]; then
    [[ -d $root ]] || usage_error "--root $root is not a directory"
    root=$(cd "$root" && pwd)
fi

proc_sys=$root/proc/sys
etc=$root/etc
sysctl_src=$profiles_dir/$profile.sysctl.conf
limits_src=$profiles_dir/$profile.limits.conf
sysctl_dst=$etc/sysctl.d/90-tessera-$profile.conf
limits_dst=$etc/security/limits.d/90-tessera.conf

if ((!dry_run)) && [[ -z $root ]] && ((EUID != 0)); then
    echo "apply.sh: changing sysctls needs root; run with sudo, or use --dry-run" >&2
    exit 1
fi

# Comparison rules: rules[name]="at-least at-most ..." (one per value field).
declare -A rules=()
while read -r name rest; do
    [[ -z $name || $name == \#* ]] && continue
    rules[$name]=$rest
done <"$profiles_dir/checks.conf"

# The profile, in file order: "name = value" lines.
keys=()
declare -A wanted=()
while IFS= read -r line; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    if [[ ! $line =~ ^[[:space:]]*([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]]; then
        echo "apply.sh: $sysctl_src: cannot parse '$line'" >&2
        exit 1
    fi
    keys+=("${BASH_REMATCH[1]}")
    wanted[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done <"$sysctl_src"

# merge RULES CURRENT WANTED: prints the value to run with, field by field: the
# better of the two for at-least/at-most fields, the profile's for exact ones.
merge() {
    local -a r c w out=()
    read -ra r <<<"$1"
    read -ra c <<<"$2"
    read -ra w <<<"$3"
    if ((${#r[@]} != ${#w[@]})); then
        echo "apply.sh: checks.conf gives ${#r[@]} rules for a ${#w[@]}-field value '$3'" >&2
        return 1
    fi
    if ((${#c[@]} != ${#w[@]})); then
        # A kernel with another value shape: take the profile's value as is.
        echo "${w[*]}"
        return 0
    fi
    local i
    for i in "${!r[@]}"; do
        case ${r[i]} in
        at-least) out+=("$((c[i] > w[i] ? c[i] : w[i]))") ;;
        at-most) out+=("$((c[i] < w[i] ? c[i] : w[i]))") ;;
        exact) out+=("${w[i]}") ;;
        *)
            echo "apply.sh: unknown rule '${r[i]}' in checks.conf" >&2
            return 1
            ;;
        esac
    done
    echo "${out[*]}"
}

# Compare.
mode="live system"
[[ -n $root ]] && mode="root $root"
((dry_run)) && mode+=", dry run: nothing will be changed"
printf 'Tessera kernel tuning: profile %s (%s)\n\n' "$profile" "$mode"
printf '%-30s %-24s %-24s %s\n' SETTING CURRENT PROFILE ACTION
to_set=()
declare -A merged=()
missing=0
for key in "${keys[@]}"; do
    [[ -n ${rules[$key]:-} ]] || {
        echo "apply.sh: $key has no rule in checks.conf" >&2
        exit 1
    }
    path=$proc_sys/${key//.//}
    if [[ ! -r $path ]]; then
        printf '%-30s %-24s %-24s %s\n' "$key" "(absent)" "${wanted[$key]}" \
            "skip: not on this kernel or not visible here"
        missing=$((missing + 1))
        continue
    fi
    # read fails at a missing final newline even after reading the value.
    read -ra cur_fields <"$path" || true
    current="${cur_fields[*]}"
    merged[$key]=$(merge "${rules[$key]}" "$current" "${wanted[$key]}")
    if [[ ${merged[$key]} == "$current" ]]; then
        action="keep"
    else
        action="set ${merged[$key]}"
        to_set+=("$key")
    fi
    printf '%-30s %-24s %-24s %s\n' "$key" "$current" "${wanted[$key]}" "$action"
done

# tcp_mem is an absolute cap in pages: warn when it is a large share of this
# machine's memory (the profile assumes a node sized for its connection count).
meminfo=$root/proc/meminfo
if [[ -n ${merged[net.ipv4.tcp_mem]:-} && -r $meminfo ]]; then
    read -ra tcp_mem <<<"${merged[net.ipv4.tcp_mem]}"
    mem_kib=$(awk '/^MemTotal:/ { print $2 }' "$meminfo")
    if [[ -n $mem_kib ]] && ((tcp_mem[2] * 4 > mem_kib / 2)); then
        printf '\nwarning: net.ipv4.tcp_mem high = %s pages (%s MiB) is over half of MemTotal (%s MiB);\n' \
            "${tcp_mem[2]}" "$((tcp_mem[2] * 4 / 1024))" "$((mem_kib / 1024))"
        printf '         this node is smaller than the "%s" profile assumes (README.md, "Memory").\n' "$profile"
    fi
fi

# The persistent files.
new_sysctl=$(
    printf '# Written by Tessera kernel-tuning/apply.sh, profile "%s".\n' "$profile"
    printf '# The profile merged with the values this machine had: nothing is lowered\n'
    printf '# below what it ran with. Re-run apply.sh instead of editing this file.\n'
    for key in "${keys[@]}"; do
        if [[ -n ${merged[$key]:-} ]]; then
            printf '%s = %s\n' "$key" "${merged[$key]}"
        fi
    done
)
new_limits=$(cat "$limits_src")

# file_change PATH CONTENT: prints what writing CONTENT to PATH does.
file_change() {
    if [[ ! -e $1 ]]; then
        echo "create"
    elif [[ "$(cat "$1")" == "$2" ]]; then
        echo "unchanged"
    else
        echo "update"
    fi
}

printf '\nFILES\n'
sysctl_change=$(file_change "$sysctl_dst" "$new_sysctl")
limits_change=$(file_change "$limits_dst" "$new_limits")
# show_file PATH CHANGE CONTENT: one line per file, and the diff of an update.
show_file() {
    printf '  %-50s %s\n' "$1" "$2"
    if [[ $2 == update ]]; then
        # diff exits 1 when the files differ, which is the point here.
        diff -u "$1" <(printf '%s\n' "$3") | sed 's/^/    /' || true
    fi
}
show_file "$sysctl_dst" "$sysctl_change" "$new_sysctl"
show_file "$limits_dst" "$limits_change" "$new_limits"
# Another profile's file would be read after or before ours at boot and win or
# lose by name order; only one Tessera profile file may exist.
stale=()
for other in "${known_profiles[@]}"; do
    [[ $other == "$profile" ]] && continue
    f=$etc/sysctl.d/90-tessera-$other.conf
    if [[ -e $f ]]; then
        stale+=("$f")
        printf '  %-50s %s\n' "$f" "remove (profile $other)"
    fi
done

printf '\n%d of %d settings to change' "${#to_set[@]}" "${#keys[@]}"
((missing)) && printf ', %d absent here' "$missing"
printf '.\n'
printf 'Limits take effect at the next login; a systemd service needs LimitNOFILE= and\n'
printf 'LimitMEMLOCK= in its unit (values in %s).\n' "profiles/$profile.limits.conf"

if ((dry_run)); then
    printf 'Dry run: nothing was changed.\n'
    exit 0
fi

# write_file PATH CONTENT: atomic replace, mode 0644.
write_file() {
    local dir tmp
    dir=$(dirname "$1")
    mkdir -p "$dir"
    tmp=$(mktemp "$dir/.90-tessera.XXXXXX")
    printf '%s\n' "$2" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$1"
}

failed=0
for key in "${to_set[@]}"; do
    if [[ -n $root ]]; then
        printf '%s\n' "${merged[$key]}" >"$proc_sys/${key//.//}" || failed=$((failed + 1))
    elif ! sysctl -q -w "$key=${merged[$key]}"; then
        echo "apply.sh: could not set $key" >&2
        failed=$((failed + 1))
    fi
done
[[ $sysctl_change == unchanged ]] || write_file "$sysctl_dst" "$new_sysctl"
[[ $limits_change == unchanged ]] || write_file "$limits_dst" "$new_limits"
for f in "${stale[@]}"; do
    rm -f "$f"
done

if ((failed)); then
    printf '%d setting(s) could not be set (read-only here? in a container, tune the host).\n' "$failed" >&2
    exit 1
fi
printf 'Applied profile %s.\n' "$profile"
