# Shared by scripts/test and scripts/demo: make sure the tools roost needs are here, installing
# what is missing on a Debian-like machine (as root). Sourced, not run.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages; refreshes the package lists once first (a fresh machine or
# container has none).
_apt_updated=
apt_update() {
  if [ -z "$_apt_updated" ]; then
    apt-get update -qq >/dev/null
    _apt_updated=1
  fi
}
apt_install() {
  [ "$(id -u)" = 0 ] || die "missing $*; run as root so they can be installed, or install them yourself"
  command -v apt-get >/dev/null 2>&1 || die "missing $*, and this is not a Debian-like system (no apt-get): install them first"
  say "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt_update
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian's nix-bin when `nix` is missing.
ensure_nix() {
  command -v nix >/dev/null 2>&1 || apt_install nix-bin
  # The publishing side's test configuration, without touching /etc/nix/nix.conf: flakes on
  # (for the tests' own `nix` calls; roost asks for its features itself), no sandbox and no
  # build users (root, no daemon), and no default substituter (this machine may be offline).
  # Nodes do not see it: the harnesses run agents with a stock Nix (roost_preflight::stock_nix).
  export NIX_CONFIG="experimental-features = nix-command flakes
sandbox = false
build-users-group =
substituters =
warn-dirty = false"
}

# Namespaces, veth pairs and traffic shaping for the fleet tests and the demo; git for the
# demo's commit; openssl for the TLS tests' certificates; dbus-daemon for the laptop tests.
ensure_tools() {
  local missing=()
  command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
  command -v mount >/dev/null 2>&1 || missing+=(mount)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # A private bus for the laptop tests' fake NetworkManager and notification listener.
  command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus-daemon)
  if ((${#missing[@]})); then
    apt_install "${missing[@]}"
  fi
}

# Debian's chromium and chromedriver, for the dashboard's browser test (tests only: the demo
# does not need them).
ensure_browser() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  if ((${#missing[@]})); then
    apt_install "${missing[@]}"
  fi
}

# roost needs Rust 1.85 or newer (edition 2024).
_rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local v
  v=$(cargo --version | awk '{print $2}')
  case "$v" in
    1.[0-7][0-9].*|1.8[0-4].*|0.*) return 1;;
  esac
}

# A Rust toolchain: the one on PATH or in ~/.cargo/bin; else Debian's when new enough (Debian
# 13 and later), else rustup's minimal stable toolchain (Debian 12's Rust is 1.63).
ensure_cargo() {
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  _rust_ok && return 0
  command -v cargo >/dev/null 2>&1 && say "cargo $(cargo --version | awk '{print $2}') is too old: roost needs Rust 1.85 or newer"
  [ "$(id -u)" = 0 ] || die "roost needs Rust 1.85 or newer (cargo); run as root to have it installed, or install it yourself (https://rustup.rs)"
  local candidate=
  if command -v apt-get >/dev/null 2>&1; then
    apt_update
    candidate=$(apt-cache policy rustc 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  case "$candidate" in
    1.8[5-9]*|1.9[0-9]*|1.[1-9][0-9][0-9]*) apt_install cargo rustc gcc libc6-dev ;;
    *)
      command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
      command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev
      say "installing Rust with rustup (minimal stable toolchain, into ~/.cargo)"
      local init
      init=$(mktemp)
      curl --proto '=https' --tlsv1.2 -sSf -o "$init" https://sh.rustup.rs ||
        die "cannot download rustup from https://sh.rustup.rs (offline?); install Rust 1.85 or newer yourself"
      sh "$init" -y --quiet --profile minimal --component rustfmt,clippy >/dev/null ||
        die "installing Rust with rustup failed; install Rust 1.85 or newer yourself"
      rm -f "$init"
      export PATH="$HOME/.cargo/bin:$PATH"
      ;;
  esac
  _rust_ok || die "no Rust 1.85 or newer after installing; install it yourself (https://rustup.rs)"
}
