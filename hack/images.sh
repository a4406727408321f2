#!/usr/bin/env bash
# Builds kubetune's two images with podman (Debian's package) and no container registry:
# the bases the Dockerfiles name are replaced by local images made from Debian packages.
#   bash hack/images.sh            build (or reuse) both images and their OCI archives
#   bash hack/images.sh --print    one line per image: <ref> <OCI archive path>
# The archives (for `ctr images import`) are rewritten only when an image's ID changed.
# Cached outside the checkout, under $KUBETUNE_IMAGES_CACHE (~/.cache/kubetune/images):
# the archives, the Debian base's root filesystem (keyed by BASE_VERSION) and containers.conf.
# Python wheels come from the host's uv cache (~/.cache/uv), bind-mounted into the build.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9 # the Dockerfiles' UV_IMAGE tag and hack/lib.sh's pin
# Bump to rebuild the local base (Debian release, packages, or how it is made changed).
BASE_VERSION=bookworm-python3.11-2
BASE_PACKAGES=python3.11,ca-certificates
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
CACHE=${KUBETUNE_IMAGES_CACHE:-$HOME/.cache/kubetune/images}
# $KUBETUNE_IMAGE_TAG (default dev) tags a build of its own, e.g. a branch's images beside
# another checkout's on the same machine (with its own $KUBETUNE_IMAGES_CACHE).
TAG=${KUBETUNE_IMAGE_TAG:-dev}
IMAGES=(trainer operator)

image_ref() { echo "localhost/kubetune/kubetune-$1:$TAG"; }
archive_path() { echo "$CACHE/kubetune-$1.oci.tar"; }
base_ref() { echo "localhost/kubetune/debian-python:$BASE_VERSION"; }
uv_ref() { echo "localhost/kubetune/uv:$UV_VERSION"; }

if [[ ${1:-} == --print ]]; then
  for image in "${IMAGES[@]}"; do echo "$(image_ref "$image") $(archive_path "$image")"; done
  exit 0
fi

source hack/lib.sh

# podman's default ulimits exceed this kind of machine's hard limits, which not even root
# may raise: containers get limits at or below the hard ones instead, from a private
# containers.conf (so /etc stays untouched). podman caps its own RLIMIT_NPROC (and so its
# children's hard limit) at 32768, whatever `ulimit -Hu` says. crun (Debian's 1.8) refuses
# hybrid cgroup v1/v2 hosts; runc runs on them.
write_containers_conf() {
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [[ $nofile == unlimited || $nofile -gt 1048576 ]] && nofile=1048576
  [[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
  cat >"$CACHE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF=$CACHE/containers.conf
}

# As Debian's own container images: apt keeps no package caches, dpkg installs no
# documentation (copyright files excepted), man pages or translations.
slim_rootfs() {
  local root=$1
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  find "$root/usr/share/doc" -type f ! -name copyright -delete
  rm -rf "$root"/usr/share/{man,info,locale}/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

# Debian bookworm minbase with Python 3.11, as a root filesystem tarball (debootstrap runs
# once per BASE_VERSION), imported into podman's storage when missing there.
ensure_base_image() {
  local ref tarball # rootfs is global: the EXIT trap removes it
  ref=$(base_ref)
  podman image exists "$ref" && return 0
  tarball=$CACHE/base/$BASE_VERSION.tar
  if [[ ! -f $tarball ]]; then
    step "debootstrap bookworm minbase ($BASE_PACKAGES)"
    local start=$SECONDS
    mkdir -p "$CACHE/base"
    rootfs=$(mktemp -d "$CACHE/base/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR"
    slim_rootfs "$rootfs"
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    echo "base root filesystem in $((SECONDS - start)) s"
  fi
  # Earlier versions of the base are of no more use.
  find "$CACHE/base" -maxdepth 1 -name '*.tar' ! -name "$BASE_VERSION.tar" -delete
  podman images --format '{{.Repository}}:{{.Tag}}' "${ref%:*}" | grep -vxF "$ref" |
    xargs --no-run-if-empty podman rmi >/dev/null || true
  step "importing $ref"
  podman import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$ref" >/dev/null
}

# The uv image the Dockerfiles copy /uv from: the pinned uv binary (from PyPI) and nothing else.
ensure_uv_image() {
  local ref uv context
  ref=$(uv_ref)
  podman image exists "$ref" && return 0
  uv=$(command -v uv)
  [[ "$("$uv" --version | cut -d' ' -f2)" == "$UV_VERSION" ]] || {
    echo "uv $UV_VERSION is needed on PATH to make $ref" >&2
    return 1
  }
  step "making $ref from $uv"
  context=$(mktemp -d)
  cp "$uv" "$(dirname "$uv")/uvx" "$context/"
  printf 'FROM scratch\nCOPY uv uvx /\n' >"$context/Containerfile"
  podman build --quiet -t "$ref" -f "$context/Containerfile" "$context" >/dev/null
  rm -rf "$context"
}

# The pinned uv on PATH (as hack/lib.sh's ensure_python_env installs it, without the sync).
ensure_uv() {
  if ! command -v uv >/dev/null 2>&1 || [[ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]]; then
    step "installing uv $UV_VERSION"
    python3 -m pip install --quiet --user "uv==$UV_VERSION"
    PATH="$(python3 -m site --user-base)/bin:$PATH"
  fi
}

# Build arguments that point a Dockerfile at the local bases (its defaults name public ones).
local_base_args() {
  local python=/usr/bin/python3.11
  echo "--build-arg=UV_IMAGE=$(uv_ref)"
  echo "--build-arg=PYTHON=$python"
  case $1 in
    trainer)
      echo "--build-arg=CUDA_IMAGE=$(base_ref)"
      echo "--build-arg=PYTHON_PACKAGES=python3.11 ca-certificates"
      ;;
    operator) echo "--build-arg=PYTHON_IMAGE=$(base_ref)" ;;
  esac
}

build_image() {
  local image=$1 start=$SECONDS args uv_cache
  mapfile -t args < <(local_base_args "$image")
  uv_cache=$(uv cache dir)
  mkdir -p "$uv_cache"
  step "building $(image_ref "$image")"
  # Host network and the host's CA bundle (a TLS-intercepting proxy's CA included): apt and
  # PyPI are reached as the host reaches them; uv reads the bundle as the system store.
  # The host's uv cache is mounted (not copied into a layer), so wheels it holds, torch's
  # included, are not downloaded again. None of these mounts ends up in the image.
  printf 'system-certs = true\n' >"$CACHE/uv.toml"
  podman build --network=host --layers -f "Dockerfile.$image" -t "$(image_ref "$image")" \
    "${args[@]}" --build-arg=UV_CACHE_DIR=/uv-cache --volume="$uv_cache:/uv-cache" \
    --volume="$CACHE/uv.toml:/etc/uv/uv.toml:ro" \
    --volume="$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" .
  echo "$(image_ref "$image") built in $((SECONDS - start)) s"
}

# An OCI archive per image, rewritten only when the image ID changed.
save_archive() {
  local image=$1 ref archive id start=$SECONDS
  ref=$(image_ref "$image")
  archive=$(archive_path "$image")
  id=$(podman image inspect --format '{{.Id}}' "$ref")
  if [[ -f $archive && -f $archive.id && "$(cat "$archive.id")" == "$id" ]]; then
    echo "$archive is up to date (image $id)"
    return 0
  fi
  step "saving $ref to $archive"
  rm -f "$archive.id" "$archive.tmp"
  # Uncompressed layers: gzip on two cores took 6 minutes for the trainer's 6.7 GB (3.3 GB
  # archive); the archive is read once, locally, by `ctr images import`.
  podman save --format oci-archive --uncompressed -o "$archive.tmp" "$ref"
  mv "$archive.tmp" "$archive"
  echo "$id" >"$archive.id"
  echo "saved in $((SECONDS - start)) s ($(du -h "$archive" | cut -f1))"
}

main() {
  ensure_apt_packages podman buildah runc debootstrap
  ensure_uv
  mkdir -p "$CACHE"
  # One build at a time per cache (hack/test.sh and hack/demo.sh may both call this).
  exec 9>"$CACHE/.lock"
  flock 9
  write_containers_conf
  ensure_base_image
  ensure_uv_image
  for image in "${IMAGES[@]}"; do
    build_image "$image"
    save_archive "$image"
  done
  step "images"
  for image in "${IMAGES[@]}"; do
    echo "$(image_ref "$image") $(archive_path "$image")"
  done
}

main "$@"
