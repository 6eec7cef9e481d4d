#!/usr/bin/env bash
# Builds evm's guest images from pinned Debian packages (guest-images/packages.lock)
# into ${EVM_CACHE:-<repo>/.cache}/guest/:
#   vmlinuz            Debian 6.1 cloud kernel (bzImage)
#   kernel/            the whole extracted linux-image .deb (boot/, lib/modules/<ver>/)
#   kernel-release     the kernel's release string (uname -r)
#   busybox            static busybox from busybox-static
#   initramfs.cpio.gz  busybox, virtio modules, /init, /sbin/evm-agent, and
#                      /usr/bin/sqlite3 with its loader and shared libraries
#   disk.ext4          64 MiB ext4 image holding /hello
#   SHA256SUMS         sha256 of the files above
# Always runs cargo for the agent (a no-op when its sources did not change),
# then rebuilds the images only when an input changed: this script, init,
# packages.lock, or the agent binary.
# Usage: guest-images/build.sh [--force]
set -euo pipefail

prog=guest-images/build.sh
die() {
    echo "$prog: error: $*" >&2
    exit 1
}
note() { echo "$prog: $*"; }

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help)
        sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (usage: $prog [--force])" ;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${EVM_CACHE:-$repo/.cache}
mkdir -p "$cache" || die "cannot create cache folder '$cache'"
cache=$(cd "$cache" && pwd)
out=$cache/guest
debs=$cache/debs
lock=$here/packages.lock
init_src=$here/init

# Fixed inputs that make the images reproducible.
export SOURCE_DATE_EPOCH=1700000000
disk_mib=64
disk_uuid=6d1f3c5e-8a2b-4c7d-9e0f-1a2b3c4d5e6f
disk_label=evm-disk
hello_line="hello from the evm guest disk"
guest_hostname=evm-guest
# Modules the initramfs loads (plus their dependencies). Built-in ones are
# skipped; anything neither built in nor shipped as a module is an error.
module_roots=(virtio_mmio virtio_blk virtio_rng virtio_pci ext4)
outputs=(vmlinuz busybox initramfs.cpio.gz disk.ext4)
# Dynamically linked programs put into the initramfs, and the packages that
# hold them and every shared library they load (all pinned in packages.lock).
# Only the programs, the loader and the libraries are copied: no docs.
userland_bins=(usr/bin/sqlite3)
userland_pkgs=(sqlite3 libsqlite3-0 libc6 zlib1g libreadline8 libtinfo6)

for tool in apt-get dpkg-deb cpio gzip mkfs.ext4 debugfs sha256sum flock cargo; do
    command -v "$tool" >/dev/null || die "'$tool' not found (run scripts/setup)"
done
modinfo=$(command -v modinfo || true)
[[ -n $modinfo ]] || modinfo=/sbin/modinfo
[[ -x $modinfo ]] || die "'modinfo' not found (install kmod; run scripts/setup)"
[[ -r $lock ]] || die "missing pin file $lock"
[[ -r $init_src ]] || die "missing init script $init_src"

mkdir -p "$out" "$debs"
exec 9>"$cache/guest.lock"
flock 9 || die "cannot lock $cache/guest.lock"

# --- agent -----------------------------------------------------------------

agent_target=$cache/agent-target
(
    cd "$repo"
    RUSTFLAGS='-C target-feature=+crt-static' \
        CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --quiet --release -p evm-agent --target x86_64-unknown-linux-gnu \
        --target-dir "$agent_target"
) || die "cargo build of evm-agent failed"
agent_bin=$agent_target/x86_64-unknown-linux-gnu/release/evm-agent
[[ -x $agent_bin ]] || die "cargo did not produce $agent_bin"
if command -v readelf >/dev/null && readelf -l "$agent_bin" | grep -q 'INTERP'; then
    die "$agent_bin is dynamically linked (want a static binary)"
fi

# --- up-to-date check ------------------------------------------------------

inputs_hash() {
    (
        cd "$repo"
        sha256sum guest-images/build.sh guest-images/init guest-images/packages.lock
        sha256sum <"$agent_bin"
    ) | sha256sum | cut -d' ' -f1
}

stamp=$out/.stamp
want=$(inputs_hash)
if [[ $force == 0 && -f $stamp && $(cat "$stamp") == "$want" && -f $out/SHA256SUMS ]] &&
    [[ -d $out/kernel/boot ]] &&
    (cd "$out" && sha256sum --quiet --status -c SHA256SUMS); then
    note "guest images are up to date in $out"
    cat "$out/SHA256SUMS"
    exit 0
fi
rm -f "$stamp"

# --- pinned packages -------------------------------------------------------

# Reads packages.lock into pin_version[pkg], pin_sha[pkg].
declare -A pin_version pin_sha
while read -r pkg ver sha rest; do
    [[ -z $pkg || $pkg == \#* ]] && continue
    [[ -n $ver && ${#sha} == 64 && -z $rest ]] ||
        die "bad line in $lock: '$pkg $ver $sha $rest' (want: <package> <version> <sha256>)"
    pin_version[$pkg]=$ver
    pin_sha[$pkg]=$sha
done <"$lock"

# Prints the path of the pinned .deb of package $1, downloading it if needed.
fetch_deb() {
    local pkg=$1 ver sha file tmp got err
    ver=${pin_version[$pkg]:-}
    sha=${pin_sha[$pkg]:-}
    [[ -n $ver ]] || die "package '$pkg' is not pinned in $lock"
    file=$debs/${pkg}_${ver//:/%3a}_amd64.deb
    if [[ -f $file ]] && [[ $(sha256sum "$file" | cut -d' ' -f1) == "$sha" ]]; then
        echo "$file"
        return
    fi
    tmp=$(mktemp -d "$debs/.dl.XXXXXX")
    local sandbox=()
    [[ $EUID == 0 ]] && sandbox=(-o APT::Sandbox::User=root)
    if ! err=$(cd "$tmp" && apt-get "${sandbox[@]}" -q download "$pkg=$ver" 2>&1); then
        rm -rf "$tmp"
        err=$(grep -m1 '^E:' <<<"$err" || true)
        die "cannot download pinned package $pkg version $ver${err:+ ($err)}; run apt-get update, or move the pin in $lock"
    fi
    got=$(find "$tmp" -name '*.deb' | head -n1)
    [[ -n $got ]] || die "apt-get download $pkg=$ver produced no .deb"
    if [[ $(sha256sum "$got" | cut -d' ' -f1) != "$sha" ]]; then
        rm -rf "$tmp"
        die "package $pkg version $ver does not match the sha256 pinned in $lock"
    fi
    mv "$got" "$file"
    rm -rf "$tmp"
    echo "$file"
}

kernel_pkg=$(grep -o '^linux-image-6\.1\.[^ ]*-cloud-amd64' "$lock" | head -n1)
[[ -n $kernel_pkg ]] || die "no linux-image-6.1.*-cloud-amd64 package pinned in $lock"
kernel_deb=$(fetch_deb "$kernel_pkg")
busybox_deb=$(fetch_deb busybox-static)
userland_debs=()
for p in "${userland_pkgs[@]}"; do
    userland_debs+=("$(fetch_deb "$p")")
done

# --- kernel ----------------------------------------------------------------

kernel_sha=$(sha256sum "$kernel_deb" | cut -d' ' -f1)
if [[ ! -f $out/kernel/.deb-sha256 || $(cat "$out/kernel/.deb-sha256") != "$kernel_sha" ]]; then
    note "extracting $(basename "$kernel_deb")"
    rm -rf "$out/kernel.new"
    dpkg-deb -x "$kernel_deb" "$out/kernel.new"
    echo "$kernel_sha" >"$out/kernel.new/.deb-sha256"
    rm -rf "$out/kernel.old"
    [[ -d $out/kernel ]] && mv "$out/kernel" "$out/kernel.old"
    mv "$out/kernel.new" "$out/kernel"
    rm -rf "$out/kernel.old"
fi
kdirs=("$out"/kernel/lib/modules/*/)
[[ ${#kdirs[@]} == 1 && -d ${kdirs[0]} ]] || die "expected one lib/modules/<ver> in $kernel_deb"
kver=$(basename "${kdirs[0]}")
kmods=$out/kernel/lib/modules/$kver
[[ -f $out/kernel/boot/vmlinuz-$kver ]] || die "$kernel_deb has no boot/vmlinuz-$kver"
install -m 0644 "$out/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
echo "$kver" >"$out/kernel-release"

# --- busybox ---------------------------------------------------------------

work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$busybox_deb" "$work/busybox-deb"
[[ -x $work/busybox-deb/bin/busybox ]] || die "$busybox_deb has no bin/busybox"
install -m 0755 "$work/busybox-deb/bin/busybox" "$out/busybox.new"
mv "$out/busybox.new" "$out/busybox"

# --- userland: dynamically linked programs and their libraries -----------

ul=$work/userland
mkdir -p "$ul"
for deb in "${userland_debs[@]}"; do
    dpkg-deb -x "$deb" "$ul"
done
# Prints path $1 (relative to $ul) with every symlink on the way followed
# inside $ul, never into this machine's own /.
ul_resolve() {
    local rel=$1 t n=0
    while [[ -L $ul/$rel ]]; do
        ((++n <= 16)) || die "symlink loop at $rel in the extracted packages"
        t=$(readlink "$ul/$rel")
        if [[ $t == /* ]]; then
            rel=${t#/}
        else
            rel=$(dirname "$rel")/$t
        fi
    done
    [[ -f $ul/$rel ]] || die "$1 is not a file in the extracted packages (${userland_pkgs[*]})"
    echo "$rel"
}
# The loader of the packages lists what each program loads, searching only
# the packages' library folders; anything found elsewhere is an error.
ul_ld=$ul/$(ul_resolve lib64/ld-linux-x86-64.so.2)
ul_libpath=$ul/lib/x86_64-linux-gnu:$ul/usr/lib/x86_64-linux-gnu
declare -A ul_files
for bin in "${userland_bins[@]}"; do
    [[ -f $ul/$bin ]] || die "no $bin in the packages ${userland_pkgs[*]}"
    ul_files[$bin]=1
    deps=$("$ul_ld" --library-path "$ul_libpath" --list "$ul/$bin") ||
        die "cannot list the libraries of $bin: $deps"
    while read -r name arrow path _; do
        [[ $name == linux-vdso.so.* ]] && continue
        [[ $arrow == "=>" ]] || die "$bin: unexpected loader output '$name $arrow $path'"
        if [[ $name == /* ]]; then
            # The ELF interpreter, at the absolute path the program names.
            ul_files[${name#/}]=1
        else
            [[ $path == "$ul"/* ]] || die "$bin needs $name, which none of ${userland_pkgs[*]} holds (found: $path)"
            ul_files[${path#"$ul"/}]=1
        fi
    done <<<"$deps"
done

# --- module load order -----------------------------------------------------

# Module name (dashes as underscores) -> path relative to $kmods.
declare -A mod_path
while IFS= read -r -d '' ko; do
    rel=${ko#"$kmods"/}
    name=$(basename "$rel")
    name=${name%.ko*}
    mod_path[${name//-/_}]=$rel
done < <(find "$kmods/kernel" -name '*.ko*' -print0)
builtin_list=$kmods/modules.builtin

declare -A mod_seen
load_order=()
skipped_builtin=()
# Appends module $1 and, before it, everything it depends on.
add_module() {
    local name=${1//-/_} rel deps dep
    [[ -n ${mod_seen[$name]:-} ]] && return
    mod_seen[$name]=1
    rel=${mod_path[$name]:-}
    if [[ -z $rel ]]; then
        if [[ -f $builtin_list ]] && sed 's|.*/||; s|\.ko$||; s|-|_|g' "$builtin_list" | grep -qx "$name"; then
            skipped_builtin+=("$name")
            return
        fi
        die "module '$name' is neither a module nor built into kernel $kver"
    fi
    deps=$("$modinfo" -F depends "$kmods/$rel") || die "modinfo failed on $kmods/$rel"
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    load_order+=("$rel")
}
for m in "${module_roots[@]}"; do
    add_module "$m"
done

# --- initramfs -------------------------------------------------------------

root=$work/initramfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,var}
install -m 0755 "$out/busybox" "$root/bin/busybox"
# Applet links, as `busybox --install -s` would make them, made here once.
while read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    [[ -e $root/$applet || -L $root/$applet ]] && continue
    mkdir -p "$(dirname "$root/$applet")"
    up=$(dirname "$applet" | sed 's|[^/]*|..|g')
    ln -s "$up/bin/busybox" "$root/$applet"
done < <("$out/busybox" --list-full)
[[ -L $root/bin/sh && -L $root/sbin/insmod ]] || die "busybox lacks sh or insmod applets"
install -m 0755 "$init_src" "$root/init"
install -m 0755 "$agent_bin" "$root/sbin/evm-agent"
# Each program and library at the path it is looked up by, as a plain file.
for rel in "${!ul_files[@]}"; do
    src=$ul/$(ul_resolve "$rel")
    mkdir -p "$root/$(dirname "$rel")"
    install -m "$(stat -c %a "$src")" "$src" "$root/$rel"
done
# They must run from there with nothing else: the initramfs's own loader
# and libraries only.
for bin in "${userland_bins[@]}"; do
    "$root/lib64/ld-linux-x86-64.so.2" --inhibit-cache \
        --library-path "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" \
        "$root/$bin" --version >/dev/null 2>&1 ||
        die "$bin does not run with the loader and libraries put into the initramfs"
done
sqlite_version=$("$root/lib64/ld-linux-x86-64.so.2" --inhibit-cache \
    --library-path "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" \
    "$root/usr/bin/sqlite3" -batch :memory: 'select sqlite_version()') ||
    die "sqlite3 from the initramfs cannot open a database"
: >"$root/etc/evm-modules"
{
    echo "# Loaded in this order by /init; paths under /lib/modules/$kver/."
    for rel in "${load_order[@]}"; do
        mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
        install -m 0644 "$kmods/$rel" "$root/lib/modules/$kver/$rel"
        echo "$rel"
    done
} >"$root/etc/evm-modules"
echo "$guest_hostname" >"$root/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
# The kernel opens /dev/console for init's stdio before /init runs.
if [[ $EUID == 0 ]]; then
    mknod -m 0600 "$root/dev/console" c 5 1
else
    note "not root: no /dev/console node in the initramfs (/init reopens the console itself)"
fi
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(
    cd "$root"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --quiet -o -H newc --reproducible -R 0:0
) | gzip -9 -n >"$out/initramfs.cpio.gz.new"
mv "$out/initramfs.cpio.gz.new" "$out/initramfs.cpio.gz"

# --- disk ------------------------------------------------------------------

disk_src=$work/disk
mkdir -p "$disk_src"
echo "$hello_line" >"$disk_src/hello"
chmod 0644 "$disk_src/hello"
find "$disk_src" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
rm -f "$out/disk.ext4.new"
truncate -s "${disk_mib}M" "$out/disk.ext4.new"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L "$disk_label" -U "$disk_uuid" \
    -E "root_owner=0:0,hash_seed=$disk_uuid,lazy_itable_init=0,lazy_journal_init=0" \
    -d "$disk_src" "$out/disk.ext4.new" ||
    die "mkfs.ext4 failed on $out/disk.ext4.new"
# mke2fs -d copies each source file's ctime (always "now"); pin all four times.
while IFS= read -r path; do
    for field in atime ctime mtime crtime; do
        echo "set_inode_field /$path $field @$SOURCE_DATE_EPOCH"
    done
done < <(cd "$disk_src" && find . -mindepth 1 -printf '%P\n') |
    E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f - "$out/disk.ext4.new" >/dev/null 2>&1 ||
    die "debugfs failed on $out/disk.ext4.new"
mv "$out/disk.ext4.new" "$out/disk.ext4"

# --- checksums -------------------------------------------------------------

(cd "$out" && sha256sum "${outputs[@]}" >SHA256SUMS.new && mv SHA256SUMS.new SHA256SUMS)
echo "$want" >"$stamp"

note "built guest images in $out"
note "kernel $kernel_pkg ${pin_version[$kernel_pkg]} ($kver)"
note "modules loaded by /init, in order: ${load_order[*]}"
note "sqlite3 $sqlite_version, with: $(printf '/%s\n' "${!ul_files[@]}" | LC_ALL=C sort | tr '\n' ' ')"
[[ ${#skipped_builtin[@]} == 0 ]] || note "built into the kernel: ${skipped_builtin[*]}"
(cd "$out" && for f in "${outputs[@]}"; do
    printf '%-18s %9s bytes\n' "$f" "$(stat -c %s "$f")"
done)
cat "$out/SHA256SUMS"
