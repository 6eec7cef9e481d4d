#!/bin/sh
# Builds evm's probe guest into ${EVM_CACHE:-<repo>/.cache}/probe/probe.elf.
# Rebuilds only when an input (this script, the sources, the compiler) changed.
# Prints the sha256 of the result. Needs gcc and binutils (x86-64).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${EVM_CACHE:-$repo/.cache}
out=$cache/probe
elf=$out/probe.elf
stamp=$out/inputs.sha256

CC=${CC:-gcc}
CFLAGS="-O2 -std=gnu11 -Wall -Wextra -Werror -ffreestanding -fno-builtin -nostdlib
 -static -fno-pie -no-pie -mno-red-zone -mgeneral-regs-only -mcmodel=small
 -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables
 -fcf-protection=none -fno-tree-loop-distribute-patterns"
LDFLAGS="-Wl,-T,$here/probe.ld -Wl,--build-id=none -Wl,-z,max-page-size=4096
 -Wl,-z,noexecstack -Wl,--no-warn-rwx-segments"

inputs=$( {
	cat "$here/build.sh" "$here/entry.S" "$here/probe.c" "$here/probe.ld"
	"$CC" --version
	echo "$CFLAGS $LDFLAGS"
} | sha256sum | cut -d' ' -f1)

if [ -f "$elf" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
	echo "probe: up to date" >&2
else
	mkdir -p "$out"
	tmp=$(mktemp -d "$out/build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	# shellcheck disable=SC2086 # the flag lists are meant to split
	"$CC" $CFLAGS $LDFLAGS -o "$tmp/probe.elf" "$here/entry.S" "$here/probe.c"
	# The marker must be where evm looks for it (the file's first 4 KiB).
	if ! readelf -n "$tmp/probe.elf" | grep -q EVMPROBE; then
		echo "probe: built image lacks the EVMPROBE note" >&2
		exit 1
	fi
	mv "$tmp/probe.elf" "$elf"
	echo "$inputs" >"$stamp"
	echo "probe: built $elf" >&2
fi
sha256sum "$elf"
