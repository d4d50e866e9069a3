#!/usr/bin/env bash
# What an operator would otherwise write: make one Ollama server hold exactly the models listed
# in MODELS_FILE (one name a line), with curl and jq against the Ollama API.
#
#   bench/baselines/converge.sh http://127.0.0.1:11434 models.txt [--plan]
#
# --plan stops after printing the difference (the listing step alone). Names are compared as
# /api/tags spells them, so spell tags out (`all-minilm:latest`).
set -euo pipefail
url=$1
wanted=$2
plan=${3:-}

installed=$(curl -fsS "$url/api/tags" | jq -r '.models[].name' | sort -u)
desired=$(grep -v '^[[:space:]]*$' "$wanted" | sort -u)
missing=$(comm -13 <(printf '%s\n' "$installed") <(printf '%s\n' "$desired") | grep -v '^$' || true)
extra=$(comm -23 <(printf '%s\n' "$installed") <(printf '%s\n' "$desired") | grep -v '^$' || true)
echo "$(printf '%s' "$missing" | grep -c . || true) to pull," \
  "$(printf '%s' "$extra" | grep -c . || true) to delete"
[ "$plan" = "--plan" ] && exit 0

for m in $missing; do
  echo "pull $m"
  curl -fsS -X POST "$url/api/pull" -H 'Content-Type: application/json' \
    -d "$(jq -nc --arg m "$m" '{model: $m, stream: false}')" | jq -e '.status == "success"' >/dev/null
done
for m in $extra; do
  echo "delete $m"
  curl -fsS -X DELETE "$url/api/delete" -H 'Content-Type: application/json' \
    -d "$(jq -nc --arg m "$m" '{model: $m}')" >/dev/null
done
