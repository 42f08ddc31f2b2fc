"""The PostgreSQL schema: keystore.storage.schema's steps, plus what is PostgreSQL's alone.

`schema_version.version` is the version; all migrations run in one transaction under an
advisory lock (keystore.postgres.connection.initialise), so two hosts running `vmshield init`
at once do not race. PostgreSQL's own parts, by step: the audit head (a one-row table whose
row lock serializes every write transaction, cluster-wide: see docs/keystore.md), the
append-only triggers, the lease table, a trigger that NOTIFYs `vmshield_usb_<vm uuid hex>`
on every change to a VM's USB rules, and two roles that separate what the CLI may do from
what a host's usbgate may do (with the guards that hold the usbgate role to its part).
"""

from __future__ import annotations

from keystore.storage.dialect import POSTGRES
from keystore.storage.schema import migrations

#: Roles are cluster-wide objects: created once, granted per database.
ADMIN_ROLE = "vmshield_admin"
USBGATE_ROLE = "vmshield_usbgate"

_V1 = """
CREATE FUNCTION vmshield_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only';
END $$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION vmshield_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION vmshield_audit_append_only();

-- the last (seq, hash) of the chain; every write transaction locks this row first
CREATE TABLE audit_head (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head VALUES (TRUE, 0, repeat('0', 64));

-- who serves which disk, cluster-wide (the lock itself is a session advisory lock)
CREATE TABLE leases (
    disk_id BIGINT PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
    holder  TEXT NOT NULL,
    backend INTEGER NOT NULL,                   -- pg_backend_pid() of the holding session
    since   TEXT NOT NULL
);

"""

_V1_TRIGGERS = """
-- live rules: usbgate LISTENs on vmshield_usb_<uuid without dashes> for each VM it serves
CREATE FUNCTION vmshield_usb_rules_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    vm TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN vm := OLD.vm_uuid; ELSE vm := NEW.vm_uuid; END IF;
    PERFORM pg_notify('vmshield_usb_' || replace(vm, '-', ''), '');
    RETURN NULL;
END $$;
CREATE TRIGGER usb_rules_notify AFTER INSERT OR UPDATE OR DELETE ON usb_rules
    FOR EACH ROW EXECUTE FUNCTION vmshield_usb_rules_notify();
CREATE FUNCTION vmshield_vms_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vmshield_usb_' || replace(OLD.uuid, '-', ''), '');
    RETURN NULL;
END $$;
CREATE TRIGGER vms_notify AFTER UPDATE OR DELETE ON vms
    FOR EACH ROW EXECUTE FUNCTION vmshield_vms_notify();
"""

_V1_ROLES = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ADMIN_ROLE}') THEN
        CREATE ROLE {ADMIN_ROLE} NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{USBGATE_ROLE}') THEN
        CREATE ROLE {USBGATE_ROLE} NOLOGIN;
    END IF;
END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON principals, vms, disks, servers, erase_permissions,
    usb_rules, meta, leases TO {ADMIN_ROLE};
GRANT SELECT, INSERT ON audit TO {ADMIN_ROLE};
GRANT SELECT, UPDATE ON audit_head TO {ADMIN_ROLE};
GRANT SELECT ON vms, usb_rules, audit TO {USBGATE_ROLE};
GRANT INSERT ON audit TO {USBGATE_ROLE};
GRANT SELECT, UPDATE ON audit_head TO {USBGATE_ROLE};
"""

# version 2: read-only serves take a shared lease, so a disk can have several holders
_V2 = """
ALTER TABLE leases DROP CONSTRAINT leases_pkey;
ALTER TABLE leases ADD COLUMN readonly INTEGER NOT NULL DEFAULT 0 CHECK (readonly IN (0, 1));
ALTER TABLE leases ADD PRIMARY KEY (disk_id, backend);
"""

# version 4: the usbgate role appends only its own rows. It computes the hash chain itself, so
# with a plain INSERT grant it could write a valid row saying "alice destroyed disk web1-0".
_V4 = f"""
CREATE FUNCTION vmshield_audit_usbgate_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_has_role(current_user, '{USBGATE_ROLE}', 'MEMBER')
       AND NOT pg_has_role(current_user, '{ADMIN_ROLE}', 'MEMBER')
       AND (NEW.actor <> 'usbgate' OR NEW.action NOT LIKE 'usb.%') THEN
        RAISE EXCEPTION 'the usbgate role appends only usb.* rows as actor usbgate'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_usbgate_rows BEFORE INSERT ON audit
    FOR EACH ROW EXECUTE FUNCTION vmshield_audit_usbgate_rows();
"""

# version 5: and it moves the chain's head only onto the row it has just appended (it could
# set any seq/hash: the next verify then failed for everyone)
_V5 = f"""
CREATE FUNCTION vmshield_audit_head_usbgate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_has_role(current_user, '{USBGATE_ROLE}', 'MEMBER')
       AND NOT pg_has_role(current_user, '{ADMIN_ROLE}', 'MEMBER')
       AND (NEW.seq <> OLD.seq + 1 OR NOT EXISTS (
            SELECT 1 FROM audit WHERE seq = NEW.seq AND hash = NEW.hash
                AND prev_hash = OLD.hash)) THEN
        RAISE EXCEPTION 'the usbgate role moves the audit head only onto the row it appended'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_head_usbgate BEFORE UPDATE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION vmshield_audit_head_usbgate();
"""

# version 6 (issue #20 B10-B12, C): the usbgate role loses every direct write and most reads.
# It appended with INSERT on audit (a usb.* row at a future seq stopped every later write,
# for good) and locked audit_head FOR UPDATE (an open transaction stopped every writer); it
# read the whole audit. Now it appends only through vmshield_usbgate_audit(), which computes
# seq, timestamp and hash itself under the head lock, and it reads the rules and the VMs'
# names. Every function gets a fixed search_path (pg_temp last) and qualified relations: the
# V5 guard read `audit` with the caller's path, where a TEMP table named audit came first.
# The advisory lock functions are taken from PUBLIC (a usbgate login held every disk's
# lease); TEMP is taken in connection.initialise (database privileges are not copied by
# CREATE DATABASE ... TEMPLATE, so they are re-applied on every init).
_V6 = rf"""
ALTER FUNCTION public.vmshield_audit_append_only() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION public.vmshield_usb_rules_notify() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION public.vmshield_vms_notify() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION public.vmshield_audit_usbgate_rows() SET search_path = pg_catalog, pg_temp;
CREATE OR REPLACE FUNCTION public.vmshield_audit_head_usbgate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_has_role(current_user, '{USBGATE_ROLE}', 'MEMBER')
       AND NOT pg_has_role(current_user, '{ADMIN_ROLE}', 'MEMBER')
       AND (NEW.seq <> OLD.seq + 1 OR NOT EXISTS (
            SELECT 1 FROM public.audit a WHERE a.seq = NEW.seq AND a.hash = NEW.hash
                AND a.prev_hash = OLD.hash)) THEN
        RAISE EXCEPTION 'the usbgate role moves the audit head only onto the row it appended'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;

-- Python's json.dumps(s) (ensure_ascii): keystore.audit.row_hash hashes that text
CREATE FUNCTION public.vmshield_json_text(s TEXT) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    out TEXT := '"';
    c TEXT;
    n INTEGER;
BEGIN
    IF s IS NULL THEN
        RETURN 'null';
    END IF;
    FOR i IN 1 .. length(s) LOOP
        c := substr(s, i, 1);
        n := ascii(c);
        IF c = '"' THEN out := out || '\"';
        ELSIF c = '\' THEN out := out || '\\';
        ELSIF n = 10 THEN out := out || '\n';
        ELSIF n = 13 THEN out := out || '\r';
        ELSIF n = 9 THEN out := out || '\t';
        ELSIF n = 8 THEN out := out || '\b';
        ELSIF n = 12 THEN out := out || '\f';
        ELSIF n BETWEEN 32 AND 126 THEN out := out || c;
        ELSIF n < 65536 THEN out := out || '\u' || lpad(to_hex(n), 4, '0');
        ELSE
            n := n - 65536;
            out := out || '\u' || to_hex(55296 + (n >> 10)) || '\u' || to_hex(56320 + (n & 1023));
        END IF;
    END LOOP;
    RETURN out || '"';
END $$;

-- End every usbgate-only session whose transaction has a transaction id, is older than 2 s and
-- is not itself waiting for a lock. After this migration such a role can get a transaction id
-- only through vmshield_usbgate_audit() (or by asking for one): an honest usbgate appends in
-- one autocommit call, done milliseconds after it has the head; a session still in that
-- transaction 2 s later, idle or busy with something else, is keeping the head from everyone.
CREATE FUNCTION public.vmshield_end_stalled_usbgate() RETURNS INTEGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r RECORD;
    ended INTEGER := 0;
BEGIN
    FOR r IN
        SELECT a.pid, a.usename, a.xact_start FROM pg_catalog.pg_stat_activity a
            JOIN pg_catalog.pg_roles u ON u.oid = a.usesysid
        WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
            AND a.datname = current_database()
            AND a.xact_start < clock_timestamp() - interval '2 seconds'
            AND a.wait_event_type IS DISTINCT FROM 'Lock'
            AND NOT u.rolsuper
            AND pg_has_role(u.oid, '{USBGATE_ROLE}', 'MEMBER')
            AND NOT pg_has_role(u.oid, '{ADMIN_ROLE}', 'MEMBER')
    LOOP
        RAISE LOG 'vmshield: ending session % of role % (in a writing transaction since %)',
            r.pid, r.usename, r.xact_start;
        PERFORM pg_terminate_backend(r.pid, 5000);
        ended := ended + 1;
    END LOOP;
    RETURN ended;
END $$;

-- Every writer's first statement: the head's row lock, waited for in 0.5 s steps (10 s in
-- all, then lock_not_available: KeystoreBusy), ending a stalled usbgate holder between steps.
CREATE FUNCTION public.vmshield_lock_audit_head(OUT seq BIGINT, OUT hash TEXT)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '500ms' AS $$
BEGIN
    FOR attempt IN 1 .. 20 LOOP
        BEGIN
            SELECT h.seq, h.hash INTO seq, hash FROM public.audit_head h FOR UPDATE;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            IF attempt = 20 THEN
                RAISE;
            END IF;
        END;
        PERFORM public.vmshield_end_stalled_usbgate();
    END LOOP;
END $$;

-- usbgate's one way to write: a usb.* row as actor usbgate, chained here under the head lock
CREATE FUNCTION public.vmshield_usbgate_audit(action TEXT, vm TEXT, detail TEXT)
RETURNS TABLE (seq BIGINT, ts TEXT, actor TEXT, action_ TEXT, vm_ TEXT, detail_ TEXT,
               prev_hash TEXT, hash TEXT)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head_seq BIGINT;
    head_hash TEXT;
    body TEXT;
BEGIN
    IF action IS NULL OR action !~ '^usb\.[a-z0-9_.-]{{1,64}}$' THEN
        RAISE EXCEPTION 'the usbgate role appends only usb.* rows as actor usbgate'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF length(vm) > 256 OR detail IS NULL OR length(detail) > 4096
       OR jsonb_typeof(detail::jsonb) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'a usbgate audit row needs a vm name of at most 256 characters and a '
            'JSON object of at most 4096 characters as detail'
            USING ERRCODE = 'data_exception';
    END IF;
    SELECT l.seq, l.hash INTO head_seq, head_hash FROM public.vmshield_lock_audit_head() l;
    seq := head_seq + 1;
    ts := to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"');
    actor := 'usbgate';
    body := '[' || seq || ',' || public.vmshield_json_text(ts) || ','
        || public.vmshield_json_text(actor) || ',' || public.vmshield_json_text(action) || ','
        || public.vmshield_json_text(vm) || ',' || public.vmshield_json_text(detail) || ']';
    prev_hash := CASE WHEN head_seq = 0 THEN repeat('0', 64) ELSE head_hash END;
    hash := encode(sha256(convert_to(prev_hash || E'\n' || body, 'UTF8')), 'hex');
    INSERT INTO public.audit (seq, ts, actor, action, vm, detail, prev_hash, hash)
        VALUES (seq, ts, actor, action, vm, detail, prev_hash, hash);
    UPDATE public.audit_head SET seq = vmshield_usbgate_audit.seq,
        hash = vmshield_usbgate_audit.hash;
    action_ := action;
    vm_ := vm;
    detail_ := detail;
    RETURN NEXT;
END $$;

REVOKE ALL ON FUNCTION public.vmshield_json_text(TEXT), public.vmshield_end_stalled_usbgate(),
    public.vmshield_lock_audit_head(), public.vmshield_usbgate_audit(TEXT, TEXT, TEXT)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.vmshield_lock_audit_head() TO {ADMIN_ROLE};
GRANT EXECUTE ON FUNCTION public.vmshield_usbgate_audit(TEXT, TEXT, TEXT)
    TO {USBGATE_ROLE}, {ADMIN_ROLE};

REVOKE ALL ON public.audit, public.audit_head, public.vms, public.usb_rules FROM {USBGATE_ROLE};
GRANT SELECT (uuid, name) ON public.vms TO {USBGATE_ROLE};
GRANT SELECT (id, vm_uuid, position, action, vendor_id, product_id, device_class, interfaces,
    serial) ON public.usb_rules TO {USBGATE_ROLE};
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
            AND p.proname LIKE 'pg\_%advisory%lock%' AND p.proname NOT LIKE '%unlock%'
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO {ADMIN_ROLE}', f);
    END LOOP;
END $$;
"""

#: MIGRATIONS[i] brings the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = migrations(
    POSTGRES,
    {
        "base": _V1 + _V1_TRIGGERS + _V1_ROLES,
        "shared-leases": _V2,
        "usbgate-rows": _V4,
        "usbgate-head": _V5,
        "usbgate-lockdown": _V6,
    },
)

SCHEMA_VERSION = len(MIGRATIONS)

#: Serializes migrations of one database (pg_advisory_xact_lock key, "vmsh" in ASCII).
MIGRATION_LOCK = 0x766D7368
