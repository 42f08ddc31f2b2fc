#!/bin/sh
# /init of the vmshield test guest: a template that scripts/build-guest fills in and packs
# into the initramfs (see its docstring for the modes).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

MARKER='@MARKER@'
FS_KIB=@FS_KIB@
RAW_OFFSET=@RAW_OFFSET@
MIN_DISK=@MIN_DISK@

fail() {
    echo "VMSHIELD-GUEST-FAIL: $*"
    sync
    poweroff -f
    sleep 1000
}

mode=none
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmshield.mode=*) mode="${arg#vmshield.mode=}" ;;
    esac
done

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
done < /lib/modules/load-order

if [ "$mode" = write ] || [ "$mode" = read ]; then
    i=0
    while [ ! -b /dev/vda ]; do
        i=$((i + 1))
        [ "$i" -le 200 ] || fail "no /dev/vda after 10 s"
        usleep 50000
    done
    size=$(blockdev --getsize64 /dev/vda) || fail "blockdev /dev/vda"
    [ "$size" -ge "$MIN_DISK" ] || fail "/dev/vda has $size bytes, need $MIN_DISK"
fi

case "$mode" in
    write)
        mke2fs -F -b 1024 -L vmshield /dev/vda "$FS_KIB" > /dev/null || fail "mke2fs"
        mount -t ext2 /dev/vda /mnt || fail "mount ext2"
        echo "$MARKER" > /mnt/marker.txt || fail "write /mnt/marker.txt"
        umount /mnt || fail "umount"
        printf '%s' "$MARKER" \
            | dd of=/dev/vda bs=4096 seek="$RAW_OFFSET" oflag=seek_bytes conv=notrunc,fsync \
                2> /dev/null || fail "raw write"
        sync
        ;;
    read)
        mount -t ext2 -o ro /dev/vda /mnt || fail "mount ext2"
        line=$(head -n 1 /mnt/marker.txt) || fail "read /mnt/marker.txt"
        umount /mnt
        echo "VMSHIELD-FILE: $line"
        raw=$(dd if=/dev/vda bs=4096 skip="$RAW_OFFSET" count="${#MARKER}" \
            iflag=skip_bytes,count_bytes 2> /dev/null) || fail "raw read"
        echo "VMSHIELD-RAW: $raw"
        ;;
    shell)
        echo "vmshield guest shell; /dev/vda is the disk; exit powers off"
        setsid cttyhack sh
        ;;
    agent)
        # Helpers for the commands (the USB tests and the demo call them by name):
        # usb_devices: USB devices other than root hubs ("1-1 0781:5567"), one a line.
        usb_devices() {
            for d in /sys/bus/usb/devices/*; do
                n=${d##*/}
                case "$n" in usb* | *:*) ;; *) echo "$n $(cat "$d/idVendor"):$(cat "$d/idProduct")" ;; esac
            done
        }
        # wait_stick SECS: wait for /dev/sda.
        wait_stick() {
            i=0
            while [ ! -b /dev/sda ]; do
                i=$((i + 1))
                [ "$i" -le $(($1 * 20)) ] || { echo "VMSHIELD-GUEST-FAIL: no /dev/sda"; return 1; }
                usleep 50000
            done
        }
        # stick_copy FILE OUTFILE TEXT: mount the stick, hash FILE, time a copy of it to RAM,
        # write TEXT to OUTFILE, sync, unmount.
        stick_copy() {
            mount -t ext4 /dev/sda /mnt || { echo "VMSHIELD-GUEST-FAIL: mount"; return 1; }
            sum=$(sha256sum "/mnt/$1") || { echo "VMSHIELD-GUEST-FAIL: read $1"; return 1; }
            echo "VMSHIELD-SHA256: ${sum%% *}"
            echo "$3" > "/mnt/$2" || { echo "VMSHIELD-GUEST-FAIL: write $2"; return 1; }
            sync
            umount /mnt || { echo "VMSHIELD-GUEST-FAIL: umount"; return 1; }
            echo "VMSHIELD-STICK-DONE"
        }
        # copy_raw MIB: read MIB MiB of the stick raw (no page cache), print the seconds.
        copy_raw() {
            echo 3 > /proc/sys/vm/drop_caches
            t0=$(cut -d' ' -f1 /proc/uptime)
            dd if=/dev/sda of=/dev/null bs=1M count="$1" 2> /dev/null || return 1
            t1=$(cut -d' ' -f1 /proc/uptime)
            echo "VMSHIELD-COPY: $t0 $t1"
        }
        # read_until_fail: read the whole stick again and again until a read fails.
        read_until_fail() {
            echo "VMSHIELD-READING"
            while dd if=/dev/sda of=/dev/null bs=64k 2> /dev/null; do
                echo 3 > /proc/sys/vm/drop_caches
            done
            echo "VMSHIELD-READ-FAILED"
        }
        # Commands, one a line, from the second serial port (ttyS1); each one's output and
        # then "VMSHIELD-AGENT-END rc=N" go back there. Kernel messages (USB connects and
        # disconnects) go to the console, ttyS0, as they happen.
        dmesg -n 7
        stty -F /dev/ttyS1 -echo -onlcr 2> /dev/null
        exec 3<> /dev/ttyS1
        echo "VMSHIELD-AGENT-READY" >&3
        while read -r line <&3; do
            [ "$line" = quit ] && break
            ( eval "$line" ) >&3 2>&1 < /dev/null
            echo "VMSHIELD-AGENT-END rc=$?" >&3
        done
        ;;
    none) ;;
    *) fail "unknown vmshield.mode=$mode" ;;
esac

echo "VMSHIELD-GUEST-DONE mode=$mode"
poweroff -f
sleep 1000
