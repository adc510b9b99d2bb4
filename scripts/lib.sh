# Shared by scripts/test and scripts/demo: make sure the tools roost needs are here.
# Sourced, not run.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian's nix-bin when `nix` is missing; needs root and apt.
ensure_nix() {
  if ! command -v nix >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "Nix is not installed; run as root so Debian's nix-bin can be installed, or install Nix yourself"
    command -v apt-get >/dev/null 2>&1 || die "Nix is not installed and this is not a Debian-like system (no apt-get); install Nix first"
    say "installing Debian's nix-bin (Nix is missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq nix-bin >/dev/null
  fi
  # A test configuration without touching /etc/nix/nix.conf: flakes on, no sandbox and no
  # build users (root, no daemon), and no default substituter (this machine may be offline).
  export NIX_CONFIG="experimental-features = nix-command flakes
sandbox = false
build-users-group =
substituters =
warn-dirty = false"
}

# Namespaces and veth pairs for the fleet tests and the demo.
ensure_tools() {
  local missing=()
  command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v git >/dev/null 2>&1 || missing+=(git)
  if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root to install them"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "cargo is missing; install a Rust toolchain (1.85 or newer)"
    say "installing Debian's cargo (Rust is missing)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cargo >/dev/null
  fi
  local v
  v=$(cargo --version | awk '{print $2}')
  case "$v" in
    1.[0-7][0-9].*|1.8[0-4].*) die "cargo $v is too old: roost needs Rust 1.85 or newer (edition 2024)";;
  esac
}
