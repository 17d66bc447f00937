#!/usr/bin/env bash
# Launch a RayJob from a suspended template RayJob in this namespace (run by the CronJobs, with
# kubectl, jq, bash and GNU date; see infra/README.md):
#   TEMPLATE      name of the template RayJob (spec.suspend: true)
#   NAME_PREFIX   the new RayJob is NAME_PREFIX-<stamp>
#   STAMP         archive-date (default): <stamp> = ARCHIVE_DATE as YYYYMMDD, one run per archive day;
#                 now: <stamp> = the UTC time as YYYYMMDD-HHMMSS
#   ARCHIVE_DATE  YYYY-MM-DD, handed to the job's submitter (default: yesterday, UTC)
#   KEEP_RAYJOBS  finished RayJobs launched from TEMPLATE to keep (default 14); older ones are deleted
# The copy is the template's spec with suspend: false and ARCHIVE_DATE set on the submitter.
# A RayJob that already exists under the new name is left alone (a retried launch is a no-op).
set -euo pipefail

: "${TEMPLATE:?TEMPLATE (the template RayJob) is not set}"
: "${NAME_PREFIX:?NAME_PREFIX is not set}"
archive_date="${ARCHIVE_DATE:-$(date -u -d yesterday +%Y-%m-%d)}"
if ! [[ "$archive_date" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
  echo "ARCHIVE_DATE must be YYYY-MM-DD, got '$archive_date'" >&2
  exit 2
fi
case "${STAMP:-archive-date}" in
  archive-date) stamp="${archive_date//-/}" ;;
  now) stamp="$(date -u +%Y%m%d-%H%M%S)" ;;
  *) echo "STAMP must be archive-date or now, got '${STAMP}'" >&2; exit 2 ;;
esac
name="${NAME_PREFIX}-${stamp}"

if kubectl get rayjob "$name" -o name >/dev/null 2>&1; then
  echo "RayJob $name already exists: nothing to launch"
else
  template_json="$(kubectl get rayjob "$TEMPLATE" -o json)"
  jq --arg name "$name" --arg template "$TEMPLATE" --arg date "$archive_date" '
    if .spec.suspend != true then error("template RayJob \($template) is not suspended") else . end
    | {apiVersion, kind,
       metadata: {
         name: $name,
         labels: ((.metadata.labels // {}) | del(.["spade-ray.io/role"])
                  + {"spade-ray.io/launched-from": $template, "spade-ray.io/archive-date": $date})},
       spec: (.spec
              | .suspend = false
              | .submitterPodTemplate.spec.containers[0].env =
                  ([(.submitterPodTemplate.spec.containers[0].env // [])[] | select(.name != "ARCHIVE_DATE")]
                   + [{name: "ARCHIVE_DATE", value: $date}]))}' <<<"$template_json" \
    | kubectl create -f -
  echo "launched RayJob $name from $TEMPLATE (archive date $archive_date)"
fi

# Finished RayJobs stay (their clusters are deleted after ttlSecondsAfterFinished); keep the
# newest KEEP_RAYJOBS of this template's, delete older finished ones.
keep="${KEEP_RAYJOBS:-14}"
kubectl get rayjobs -l "spade-ray.io/launched-from=$TEMPLATE" -o json \
  | jq -r --argjson keep "$keep" '
      [.items[] | select(.status.jobDeploymentStatus == "Complete" or .status.jobDeploymentStatus == "Failed"
                         or .status.jobDeploymentStatus == "ValidationFailed")]
      | sort_by(.metadata.creationTimestamp) | reverse | .[$keep:][] | .metadata.name' \
  | while read -r old; do
      kubectl delete rayjob "$old" --wait=false
    done
