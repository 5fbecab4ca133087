"""Status message IDs. Real SMS 2.0 IDs where they exist (Hierarchy Manager 3300-3312, Site
Control Manager 2800-2803); IDs of our own from 5000 for the rest, documented here."""

from __future__ import annotations

# Hierarchy Manager (SMS 2.0 Resource Guide, table 26.29)
HMAN_LOOP = 3300
HMAN_DUPLICATE_CODE = 3301
# Site Control Manager (table 26.24)
SCM_BEGIN = 2800
SCM_DONE = 2801
SCM_INCOMPLETE = 2802
# ours
SITE_HEARTBEAT = 5000  # a site's periodic "I am alive" status
SCM_OLDER_DELTA = 5010  # a delta site control file at or below the last processed serial: ignored
LINK_DEGRADED = 5100
LINK_FAILED = 5101
LINK_ACTIVE = 5102
ROLLBACK_DETECTED = 5200  # a peer's counters went backwards (AD event 2095 analog)
ROLLBACK_SELF = 5201  # a peer acknowledges more than this site sent: restored without recovery
FENCED = 5202
KEY_CHANGED = 5210  # hardened: the key pinned for a site changed (its recovery, or by hand)
KEY_RETIRED = 5211  # hardened: data signed with a key retired by its origin's recovery, refused
RECOVERY_STARTED = 5300
RECOVERY_PHASE = 5301
RECOVERY_COMPLETE = 5302
PEER_RECOVERY = 5310  # a neighbour is recovering: link paused / resumed
PEER_RECOVERY_TIMEOUT = 5311  # a neighbour announced a recovery and did not resync in time: link resumed
SITE_DELETED = 5320  # delsite removed a site's data here
QUEUE_RESTORED = 5400  # the broker deleted one of the site's queues; the site declared it again

_COMPONENTS = {
    3300: "SMS_HIERARCHY_MANAGER", 3301: "SMS_HIERARCHY_MANAGER",
    2800: "SMS_SITE_CONTROL_MANAGER", 2801: "SMS_SITE_CONTROL_MANAGER",
    2802: "SMS_SITE_CONTROL_MANAGER", 5010: "SMS_SITE_CONTROL_MANAGER",
    5000: "SMS_SITE_COMPONENT_MANAGER",
}


def component_of(message_id: int) -> str:
    if message_id in _COMPONENTS:
        return _COMPONENTS[message_id]
    if 5300 <= message_id < 5400:
        return "SMSLAB_RECOVERY_AGENT"
    return "SMS_REPLICATION_MANAGER"
