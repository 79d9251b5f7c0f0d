#!/usr/bin/env bash
# Fetch the pre-trained checkpoints, FID reference statistics and prompts the LD3 configs expect.
# Run `bash scripts/download_model.sh --help` for the targets. Downloads resume (curl -C - / wget -c),
# are checked (HTTP status, size against the server's Content-Length, sha256 where known, file type),
# and the script ends with a summary; it exits 1 if anything failed, 2 on a usage error.
set -u -o pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/download_model.sh [--dir DIR] [--dry-run] TARGET [TARGET ...]

targets (files land where configs/*.yml look for them, relative to DIR):
  cifar10   pretrained/edm-cifar10-32x32-uncond-vp.pkl      + fid-refs/cifar10-32x32.npz
  ffhq      pretrained/edm-ffhq-64x64-uncond-vp.pkl         + fid-refs/ffhq-64x64.npz
  afhqv2    pretrained/edm-afhqv2-64x64-uncond-vp.pkl       + fid-refs/afhqv2-64x64.npz
  lsun      pretrained/ldm/lsun_beds256/model.ckpt, pretrained/first_stage_models/vq-f4/model.ckpt
                                                            + fid-refs/VIRTUAL_lsun_bedroom256.npz
  imagenet  pretrained/ldm/cin256-v2/model.ckpt             + fid-refs/VIRTUAL_imagenet256_labeled.npz
  sd14      pretrained/ldm/stable-diffusion-v1/sd-v1-4.ckpt + CLIP tokenizer files (clip)
  sd15      pretrained/ldm/stable-diffusion-v1/v1-5-pruned-emaonly.ckpt + CLIP tokenizer files (clip)
  clip      pretrained/clip-vit-large-patch14/{vocab.json,merges.txt,config.json,...} (offline SD text side)
  coco      captions_val2014.json (MS-COCO 2014 captions, for --prompt_path; from the 241 MB annotation zip)
  edm       cifar10 ffhq afhqv2          ldm   lsun imagenet          sd   sd14 sd15
  all       everything above

options:
  --dir DIR   root folder (default: the repository root, the parent of scripts/)
  --dry-run   print what would be fetched, download nothing
  -h, --help  this text

environment:
  HF_TOKEN    sent to huggingface.co (sd-v1-4.ckpt needs an account that accepted its license)
  LD3_MIRROR  fetch every file as $LD3_MIRROR/<its path under DIR> instead, e.g. file:///shared/ld3 (the DIR of
              a machine that ran this script) or an internal http server: for machines without internet
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dir) [ $# -ge 2 ] || { echo "error: --dir needs a folder" >&2; exit 2; }; ROOT="$2"; shift 2 ;;
    --dir=*) ROOT="${1#--dir=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || { usage >&2; echo "error: name at least one target" >&2; exit 2; }

EDM=https://nvlabs-fi-cdn.nvidia.com/edm
OPENAI_REF=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches
OMMER=https://ommer-lab.com/files/latent-diffusion
HF=https://huggingface.co
SHA_SD14=fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556
SHA_SD15=cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516

OK_LIST=()
FAIL_LIST=()
ok()   { OK_LIST+=("$1"); }
fail() { FAIL_LIST+=("$1: $2"); echo "FAILED: $1: $2" >&2; }

if command -v curl >/dev/null 2>&1; then TOOL=curl
elif command -v wget >/dev/null 2>&1; then TOOL=wget
else echo "error: neither curl nor wget is installed" >&2; exit 1
fi

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

file_size() { wc -c < "$1" | tr -d ' '; }

# kind of content expected: pickle (EDM), zip (.npz, .zip), torch (.ckpt), json, text
looks_like() {  # file kind
  local head
  head="$(head -c 2 "$1" | od -An -tx1 | tr -d ' \n')"
  case "$2" in
    pickle) [ "${head:0:2}" = "80" ] ;;
    zip)    [ "$head" = "504b" ] ;;
    torch)  [ "$head" = "504b" ] || [ "${head:0:2}" = "80" ] ;;  # torch.save: zip, or the legacy pickle
    json)   [ "$(tr -d ' \n\r\t' < "$1" | head -c 1)" = "{" ] ;;
    *)      [ -s "$1" ] ;;
  esac
}

remote_size() {  # url -> Content-Length of the final response (empty if unknown)
  [ "$TOOL" = curl ] || return 0
  local auth=()
  case "$1" in "$HF"/*) [ -n "${HF_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $HF_TOKEN") ;; esac
  curl -sIL --max-time 60 ${auth[@]+"${auth[@]}"} "$1" 2>/dev/null \
    | awk 'tolower($1)=="content-length:" {v=$2} END {print v}' | tr -d '\r'
}

transfer() {  # url part-file -> 0 on success (resumes part-file)
  local url="$1" part="$2" auth=()
  case "$url" in "$HF"/*) [ -n "${HF_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $HF_TOKEN") ;; esac
  if [ "$TOOL" = curl ]; then
    curl -fL --retry 3 --retry-delay 5 --connect-timeout 30 -C - ${auth[@]+"${auth[@]}"} -o "$part" "$url"
  else
    local hdr=()
    [ ${#auth[@]} -gt 0 ] && hdr=(--header "${auth[1]}")
    wget -c --tries=3 ${hdr[@]+"${hdr[@]}"} -O "$part" "$url"
  fi
}

verify() {  # file kind sha -> prints a reason and returns 1 if wrong
  local f="$1" kind="$2" sha="$3"
  [ -s "$f" ] || { echo "empty file"; return 1; }
  looks_like "$f" "$kind" || { echo "not a $kind file (an error page?)"; return 1; }
  if [ -n "$sha" ]; then
    local got; got="$(sha256_of "$f")"
    [ "$got" = "$sha" ] || { echo "sha256 $got, expected $sha"; return 1; }
  fi
  return 0
}

# fetch NAME DEST KIND SHA URL [URL ...]: download DEST (resuming DEST.part) from the first URL that works
fetch() {
  local name="$1" rel="$2" dest="$ROOT/$2" kind="$3" sha="$4"; shift 4
  local urls=("$@")
  if [ -n "${LD3_MIRROR:-}" ]; then urls=("${LD3_MIRROR%/}/$rel"); fi
  local part="$dest.part" url size want reason="" tried=0
  if [ "$DRY" = 1 ]; then echo "would fetch $rel <- ${urls[0]}${sha:+ (sha256 $sha)}"; return 0; fi
  if [ -f "$dest" ] && verify "$dest" "$kind" "$sha" >/dev/null; then
    echo "ok (already there): $rel"; ok "$rel"; return 0
  fi
  mkdir -p "$(dirname "$dest")" || { fail "$rel" "cannot create $(dirname "$dest")"; return 1; }
  for url in "${urls[@]}"; do
    tried=1
    want="$(remote_size "$url")"
    if [ -f "$part" ] && [ -n "$want" ] && [ "$(file_size "$part")" = "$want" ]; then
      echo "complete partial download found: $rel"
    elif echo "fetching $rel <- $url" && ! transfer "$url" "$part"; then
      # a stale or complete .part makes the resume request fail: start that URL once from scratch
      rm -f "$part"
      transfer "$url" "$part" || { reason="download failed from $url"; continue; }
    fi
    size="$(file_size "$part")"
    if [ -n "$want" ] && [ "$want" != "$size" ]; then
      reason="size $size bytes, the server announces $want (interrupted? run again to resume)"; continue
    fi
    if reason="$(verify "$part" "$kind" "$sha")"; then
      mv -f "$part" "$dest" && { echo "ok: $rel ($size bytes)"; ok "$rel"; return 0; }
      reason="cannot move $part to $dest"
    else
      rm -f "$part"  # wrong content: do not resume from it next time
    fi
  done
  [ "$tried" = 1 ] || reason="no URL"
  fail "$rel" "$reason"
  return 1
}

# fetch_zip NAME ZIPDEST MEMBER OUT URL...: download a zip, extract MEMBER as OUT (relative paths)
fetch_zip() {
  local name="$1" zip="$2" member="$3" out="$4"; shift 4
  if [ "$DRY" = 1 ]; then fetch "$name" "$zip" zip "" "$@"; echo "would extract $member -> $out"; return 0; fi
  if [ -f "$ROOT/$out" ] && [ -s "$ROOT/$out" ]; then echo "ok (already there): $out"; ok "$out"; return 0; fi
  if [ -n "${LD3_MIRROR:-}" ]; then  # a mirror holds the extracted file at the same place
    case "$out" in *.json) fetch "$name" "$out" json "" ;; *) fetch "$name" "$out" torch "" ;; esac
    return
  fi
  fetch "$name" "$zip" zip "" "$@" || return 1
  unset 'OK_LIST[${#OK_LIST[@]}-1]'  # count the extracted file, not the archive
  command -v unzip >/dev/null 2>&1 || { fail "$out" "unzip is not installed (the archive is at $zip)"; return 1; }
  unzip -tq "$ROOT/$zip" >/dev/null 2>&1 || { rm -f "$ROOT/$zip"; fail "$out" "$zip is a broken zip (removed; run again)"; return 1; }
  # the member by its path, else the one file of that name anywhere in the archive
  local base; base="$(basename "$member")"
  if ! unzip -Z1 "$ROOT/$zip" 2>/dev/null | grep -qxF "$member"; then
    member="$(unzip -Z1 "$ROOT/$zip" 2>/dev/null | grep -E "(^|/)${base//./\\.}\$" | head -n 1)"
    [ -n "$member" ] || { fail "$out" "$zip has no $base"; return 1; }
  fi
  local tmp; tmp="$(mktemp -d "$ROOT/.unzip.XXXXXX")"
  if unzip -o -q "$ROOT/$zip" "$member" -d "$tmp" && [ -s "$tmp/$member" ]; then
    mkdir -p "$(dirname "$ROOT/$out")" && mv -f "$tmp/$member" "$ROOT/$out"
    rm -rf "$tmp"
    rm -f "$ROOT/$zip"  # extracted: the archive is not needed any more
    echo "ok: $out (from $zip)"; ok "$out"
  else
    rm -rf "$tmp"
    fail "$out" "$zip has no $member"
    return 1
  fi
}

get_cifar10() {
  fetch cifar10 pretrained/edm-cifar10-32x32-uncond-vp.pkl pickle "" "$EDM/pretrained/edm-cifar10-32x32-uncond-vp.pkl"
  fetch cifar10 fid-refs/cifar10-32x32.npz zip "" "$EDM/fid-refs/cifar10-32x32.npz"
}
get_ffhq() {
  fetch ffhq pretrained/edm-ffhq-64x64-uncond-vp.pkl pickle "" "$EDM/pretrained/edm-ffhq-64x64-uncond-vp.pkl"
  fetch ffhq fid-refs/ffhq-64x64.npz zip "" "$EDM/fid-refs/ffhq-64x64.npz"
}
get_afhqv2() {
  fetch afhqv2 pretrained/edm-afhqv2-64x64-uncond-vp.pkl pickle "" "$EDM/pretrained/edm-afhqv2-64x64-uncond-vp.pkl"
  fetch afhqv2 fid-refs/afhqv2-64x64.npz zip "" "$EDM/fid-refs/afhqv2-64x64.npz"
}
get_lsun() {
  fetch_zip lsun pretrained/first_stage_models/vq-f4/vq-f4.zip model.ckpt \
    pretrained/first_stage_models/vq-f4/model.ckpt "$OMMER/vq-f4.zip"
  fetch_zip lsun pretrained/ldm/lsun_beds256/lsun_bedrooms.zip model.ckpt \
    pretrained/ldm/lsun_beds256/model.ckpt "$OMMER/lsun_bedrooms.zip"
  fetch lsun fid-refs/VIRTUAL_lsun_bedroom256.npz zip "" "$OPENAI_REF/lsun/bedroom/VIRTUAL_lsun_bedroom256.npz"
}
get_imagenet() {
  fetch imagenet pretrained/ldm/cin256-v2/model.ckpt torch "" "$OMMER/nitro/cin/model.ckpt"
  fetch imagenet fid-refs/VIRTUAL_imagenet256_labeled.npz zip "" "$OPENAI_REF/imagenet/256/VIRTUAL_imagenet256_labeled.npz"
}
get_clip() {
  local f kind
  for f in vocab.json merges.txt config.json tokenizer_config.json special_tokens_map.json; do
    case "$f" in *.json) kind=json ;; *) kind=text ;; esac
    fetch clip "pretrained/clip-vit-large-patch14/$f" "$kind" "" "$HF/openai/clip-vit-large-patch14/resolve/main/$f"
  done
}
get_sd14() {
  fetch sd14 pretrained/ldm/stable-diffusion-v1/sd-v1-4.ckpt torch "$SHA_SD14" \
    "$HF/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt"
  get_clip
}
get_sd15() {
  fetch sd15 pretrained/ldm/stable-diffusion-v1/v1-5-pruned-emaonly.ckpt torch "$SHA_SD15" \
    "$HF/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt" \
    "$HF/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt"
}
get_coco() {
  fetch_zip coco data/annotations_trainval2014.zip annotations/captions_val2014.json captions_val2014.json \
    http://images.cocodataset.org/annotations/annotations_trainval2014.zip
}

expand() {
  case "$1" in
    all) echo cifar10 ffhq afhqv2 lsun imagenet sd14 sd15 clip coco ;;
    edm) echo cifar10 ffhq afhqv2 ;;
    ldm) echo lsun imagenet ;;
    sd) echo sd14 sd15 clip ;;
    sd14|sd15) echo "$1" clip ;;
    cifar10|ffhq|afhqv2|lsun|imagenet|clip|coco) echo "$1" ;;
    *) return 1 ;;
  esac
}

LIST=()
for t in "${TARGETS[@]}"; do
  names="$(expand "$t")" || { echo "error: unknown target '$t' (see --help)" >&2; exit 2; }
  for n in $names; do
    case " ${LIST[*]:-} " in *" $n "*) ;; *) LIST+=("$n") ;; esac
  done
done

mkdir -p "$ROOT" 2>/dev/null || { echo "error: cannot create $ROOT" >&2; exit 2; }
for n in "${LIST[@]}"; do
  "get_$n"
done

echo
echo "summary: ${#OK_LIST[@]} file(s) in place under $ROOT, ${#FAIL_LIST[@]} failed"
for f in "${FAIL_LIST[@]:-}"; do [ -n "$f" ] && echo "  FAILED $f"; done
[ ${#FAIL_LIST[@]} -eq 0 ]
