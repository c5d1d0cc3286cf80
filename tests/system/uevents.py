"""What udev would run for a xen-backend vif uevent, asked of udev itself.

A container has no Xen, so no xen-backend device.  `udevadm test` reads a device
from sysfs; as systemd's own rule tests do (test/udev-test.pl), we give it a
small fake sysfs (a tmpfs over /sys in a private mount namespace inside the
container) holding the device the kernel would make: /sys/devices/vif-D-N, its
`subsystem` link to bus/xen-backend, and a `uevent` file with the variables of
the kernel's event (xenbus_probe_backend.c and xen-netback's uevent: XENBUS_TYPE,
XENBUS_PATH, XENBUS_BASE_PATH, script, vif).  SYSTEMD_DEVICE_VERIFY_SYSFS=0
lets sd-device accept a /sys that is not sysfs.  udev's real rules engine then
reads every installed rules file and lists the programs it would RUN (it runs
none of them).

    would_run(box, action, domid, devid=0, script=XEN_SCRIPT) -> list[str]
"""

import re
import shlex

XEN_SCRIPT = "/etc/xen/scripts/vif-route-qubes"
_SCRIPT = """#!/bin/sh
# fake sysfs for one xen-backend vif (tests/system/uevents.py); runs in its own mount namespace
set -e
dev=$1 action=$2 xenbus=$3 script=$4 vif=$5
mount -t tmpfs vrq-fake-sysfs /sys
mkdir -p "/sys/devices/$dev" /sys/bus/xen-backend/devices
ln -s ../../bus/xen-backend "/sys/devices/$dev/subsystem"
ln -s "../../../devices/$dev" "/sys/bus/xen-backend/devices/$dev"
printf 'XENBUS_TYPE=vif\\nXENBUS_PATH=%s\\nXENBUS_BASE_PATH=backend\\nscript=%s\\nvif=%s\\n' \\
    "$xenbus" "$script" "$vif" >"/sys/devices/$dev/uevent"
SYSTEMD_DEVICE_VERIFY_SYSFS=0 udevadm test --action="$action" "/sys/devices/$dev" 2>&1
"""


def would_run(box, action: str, domid: int, devid: int = 0, script: str = XEN_SCRIPT) -> list[str]:
    box.write("/root/vrq-fake-uevent.sh", _SCRIPT, 0o755)
    args = [f"vif-{domid}-{devid}", action, f"backend/vif/{domid}/{devid}", script, f"vif{domid}.{devid}"]
    out = box.run("unshare -m /root/vrq-fake-uevent.sh " + " ".join(map(shlex.quote, args))).stdout
    # the device must have been read with the event's variables, or the answer means nothing
    assert f"script={script}" in out and "SUBSYSTEM=xen-backend" in out, f"udevadm did not read the device:\n{out}"
    return re.findall(r"^run: '(.*)'$", out, flags=re.M)
