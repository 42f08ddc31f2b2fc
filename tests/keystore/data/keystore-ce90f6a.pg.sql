-- made by tests/keystore/data/make_upgrade_fixtures.py at ce90f6a
--
-- PostgreSQL database dump
--

\restrict fhAnlOFfRSUZkyqMsOvWCtrNWee5C4DhCTq7bs0R774nsJoY4aO9NuVtAsi5j3i

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: vmshield_audit_append_only(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_audit_append_only() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only';
END $$;


--
-- Name: vmshield_audit_head_usbgate(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_audit_head_usbgate() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF pg_has_role(current_user, 'vmshield_usbgate', 'MEMBER')
       AND NOT pg_has_role(current_user, 'vmshield_admin', 'MEMBER')
       AND (NEW.seq <> OLD.seq + 1 OR NOT EXISTS (
            SELECT 1 FROM public.audit a WHERE a.seq = NEW.seq AND a.hash = NEW.hash
                AND a.prev_hash = OLD.hash)) THEN
        RAISE EXCEPTION 'the usbgate role moves the audit head only onto the row it appended'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;


--
-- Name: vmshield_audit_usbgate_rows(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_audit_usbgate_rows() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF pg_has_role(current_user, 'vmshield_usbgate', 'MEMBER')
       AND NOT pg_has_role(current_user, 'vmshield_admin', 'MEMBER')
       AND (NEW.actor <> 'usbgate' OR NEW.action NOT LIKE 'usb.%') THEN
        RAISE EXCEPTION 'the usbgate role appends only usb.* rows as actor usbgate'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;


--
-- Name: vmshield_end_stalled_usbgate(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_end_stalled_usbgate() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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
            AND pg_has_role(u.oid, 'vmshield_usbgate', 'MEMBER')
            AND NOT pg_has_role(u.oid, 'vmshield_admin', 'MEMBER')
    LOOP
        RAISE LOG 'vmshield: ending session % of role % (in a writing transaction since %)',
            r.pid, r.usename, r.xact_start;
        PERFORM pg_terminate_backend(r.pid, 5000);
        ended := ended + 1;
    END LOOP;
    RETURN ended;
END $$;


--
-- Name: vmshield_json_text(text); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_json_text(s text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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


--
-- Name: vmshield_lock_audit_head(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_lock_audit_head(OUT seq bigint, OUT hash text) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET lock_timeout TO '500ms'
    AS $$
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


--
-- Name: vmshield_usb_rules_notify(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_usb_rules_notify() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    vm TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN vm := OLD.vm_uuid; ELSE vm := NEW.vm_uuid; END IF;
    PERFORM pg_notify('vmshield_usb_' || replace(vm, '-', ''), '');
    RETURN NULL;
END $$;


--
-- Name: vmshield_usbgate_audit(text, text, text); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_usbgate_audit(action text, vm text, detail text) RETURNS TABLE(seq bigint, ts text, actor text, action_ text, vm_ text, detail_ text, prev_hash text, hash text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    head_seq BIGINT;
    head_hash TEXT;
    body TEXT;
BEGIN
    IF action IS NULL OR action !~ '^usb\.[a-z0-9_.-]{1,64}$' THEN
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
END $_$;


--
-- Name: vmshield_vms_notify(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.vmshield_vms_notify() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    PERFORM pg_notify('vmshield_usb_' || replace(OLD.uuid, '-', ''), '');
    RETURN NULL;
END $$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: audit; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.audit (
    seq bigint NOT NULL,
    ts text NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    vm text,
    detail text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL
);


--
-- Name: audit_head; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.audit_head (
    one boolean DEFAULT true NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    CONSTRAINT audit_head_one_check CHECK (one)
);


--
-- Name: disks; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.disks (
    id bigint NOT NULL,
    name text NOT NULL,
    vm_uuid text NOT NULL,
    path text NOT NULL,
    format text NOT NULL,
    cipher text NOT NULL,
    size bigint NOT NULL,
    state text NOT NULL,
    created text NOT NULL,
    luks_uuid text,
    st_dev bigint,
    st_ino bigint,
    CONSTRAINT disks_size_check CHECK ((size > 0)),
    CONSTRAINT disks_state_check CHECK ((state = ANY (ARRAY['creating'::text, 'ready'::text, 'destroying'::text, 'destroyed'::text, 'failed'::text])))
);


--
-- Name: disks_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

ALTER TABLE public.disks ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.disks_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: erase_permissions; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.erase_permissions (
    vm_uuid text NOT NULL,
    deep_erase integer NOT NULL,
    normal_delete integer NOT NULL,
    updated text NOT NULL,
    CONSTRAINT erase_permissions_deep_erase_check CHECK ((deep_erase = ANY (ARRAY[0, 1]))),
    CONSTRAINT erase_permissions_normal_delete_check CHECK ((normal_delete = ANY (ARRAY[0, 1])))
);


--
-- Name: leases; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.leases (
    disk_id bigint NOT NULL,
    holder text NOT NULL,
    backend integer NOT NULL,
    since text NOT NULL,
    readonly integer DEFAULT 0 NOT NULL,
    CONSTRAINT leases_readonly_check CHECK ((readonly = ANY (ARRAY[0, 1])))
);


--
-- Name: meta; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.meta (
    key text NOT NULL,
    value text NOT NULL
);


--
-- Name: principals; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.principals (
    name text NOT NULL,
    verifier text NOT NULL,
    failed_attempts integer DEFAULT 0 NOT NULL,
    locked_until text,
    created text NOT NULL,
    last_login text
);


--
-- Name: schema_version; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_version (
    version integer NOT NULL
);


--
-- Name: servers; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.servers (
    disk_id bigint NOT NULL,
    socket text NOT NULL,
    pidfile text NOT NULL,
    pid integer NOT NULL,
    readonly integer NOT NULL,
    started text NOT NULL,
    CONSTRAINT servers_readonly_check CHECK ((readonly = ANY (ARRAY[0, 1])))
);


--
-- Name: usb_rules; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.usb_rules (
    id bigint NOT NULL,
    vm_uuid text NOT NULL,
    "position" integer NOT NULL,
    action text NOT NULL,
    vendor_id integer,
    product_id integer,
    device_class integer,
    interfaces text,
    serial text,
    created text NOT NULL,
    CONSTRAINT usb_rules_action_check CHECK ((action = ANY (ARRAY['allow'::text, 'block'::text, 'reject'::text])))
);


--
-- Name: usb_rules_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

ALTER TABLE public.usb_rules ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.usb_rules_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: vms; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.vms (
    uuid text NOT NULL,
    name text NOT NULL,
    owner text NOT NULL,
    pool_uuid text,
    domain_uuid text,
    created text NOT NULL,
    last_access text,
    access_count integer DEFAULT 0 NOT NULL,
    unlock_policy text DEFAULT 'any'::text NOT NULL,
    CONSTRAINT vms_unlock_policy_check CHECK ((unlock_policy = ANY (ARRAY['owner'::text, 'network'::text, 'host-key'::text, 'any'::text])))
);


--
-- Data for Name: audit; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.audit VALUES (1, '2026-12-07T04:18:22.950976+00:00', 'admin@cli', 'keystore.init', NULL, '{"os_uid":0,"os_user":"root","schema":7}', '0000000000000000000000000000000000000000000000000000000000000000', '2cdf3dc8bf7fc8fa9f99c8ab83f9cabcbcadc5db0f6fce1da89c2cd896354262');
INSERT INTO public.audit VALUES (2, '2026-12-07T04:18:23.010425+00:00', 'admin@cli', 'user.add', NULL, '{"os_uid":0,"os_user":"root","user":"alice"}', '2cdf3dc8bf7fc8fa9f99c8ab83f9cabcbcadc5db0f6fce1da89c2cd896354262', '85ac315c383fe56df685fc4d4d1de60fc5f4404af388366887f8b31d732c2a50');
INSERT INTO public.audit VALUES (3, '2026-12-07T04:18:23.043974+00:00', 'admin@cli', 'user.add', NULL, '{"os_uid":0,"os_user":"root","user":"bob"}', '85ac315c383fe56df685fc4d4d1de60fc5f4404af388366887f8b31d732c2a50', 'eaab9ee140afcd2a2547089ea766e2af528b55bef0e1f39654279d6121b26231');
INSERT INTO public.audit VALUES (4, '2026-12-07T04:18:23.068143+00:00', 'admin@cli', 'vm.add', 'web1', '{"domain_uuid":null,"os_uid":0,"os_user":"root","owner":"alice","pool_uuid":null,"uuid":"0f0e0d0c-0b0a-4908-8706-050403020100"}', 'eaab9ee140afcd2a2547089ea766e2af528b55bef0e1f39654279d6121b26231', '7522e4dd674e025147ed9bd2eb57b467085d16df5a030f6872c8e67321374b94');
INSERT INTO public.audit VALUES (5, '2026-12-07T04:18:23.116317+00:00', 'admin@cli', 'disk.add', 'web1', '{"cipher":"aes-xts-plain64","disk":"web1-0","format":"luks2","os_uid":0,"os_user":"root","path":"/srv/vmshield/web1-0.img","size":1073741824,"state":"creating"}', '7522e4dd674e025147ed9bd2eb57b467085d16df5a030f6872c8e67321374b94', 'a2a8c915a1926e002af945e2af5a42d643b8b94aa511dc40f90ede55fe13559b');
INSERT INTO public.audit VALUES (6, '2026-12-07T04:18:23.135048+00:00', 'admin@cli', 'disk.identity', 'web1', '{"disk":"web1-0","luks_uuid":"6a1f0c3e-2d7b-4c4e-9a55-0123456789ab","os_uid":0,"os_user":"root","st_dev":2049,"st_ino":1099511627776}', 'a2a8c915a1926e002af945e2af5a42d643b8b94aa511dc40f90ede55fe13559b', '36c89677cd316308a23758a5cac328dbf5dd25fa957a65cb17c45a3359d9906a');
INSERT INTO public.audit VALUES (7, '2026-12-07T04:18:23.159409+00:00', 'admin@cli', 'disk.state', 'web1', '{"disk":"web1-0","from":"creating","os_uid":0,"os_user":"root","to":"ready"}', '36c89677cd316308a23758a5cac328dbf5dd25fa957a65cb17c45a3359d9906a', '47b913bc7d02d1d8c5bbfe314499a0d2f3ec29fae3e059abcecfd2275a9c33c5');
INSERT INTO public.audit VALUES (8, '2026-12-07T04:18:23.181821+00:00', 'admin@cli', 'disk.serve', 'web1', '{"disk":"web1-0","os_uid":0,"os_user":"root","pid":4242,"readonly":false,"socket":"/run/vmshield/web1-0.sock"}', '47b913bc7d02d1d8c5bbfe314499a0d2f3ec29fae3e059abcecfd2275a9c33c5', 'f70d6bcfd4411fe2cc455fbba9e22c98cd3eae81057d6a133a925c704990af2a');
INSERT INTO public.audit VALUES (9, '2026-12-07T04:18:23.208803+00:00', 'admin@cli', 'perm.set', 'web1', '{"deep_erase":true,"normal_delete":true,"os_uid":0,"os_user":"root"}', 'f70d6bcfd4411fe2cc455fbba9e22c98cd3eae81057d6a133a925c704990af2a', '31557d9b0899f545821d21757f8797c60f90bf2e300513c0626d15cda6b0c711');
INSERT INTO public.audit VALUES (10, '2026-12-07T04:18:23.229053+00:00', 'admin@cli', 'vm.set', 'web1', '{"os_uid":0,"os_user":"root","unlock":"network"}', '31557d9b0899f545821d21757f8797c60f90bf2e300513c0626d15cda6b0c711', '1d0b62b2015fdc34a2c3933c5db1f6c21f6082c7214d75eaba90eea799c8f508');
INSERT INTO public.audit VALUES (11, '2026-12-07T04:18:23.260295+00:00', 'admin@cli', 'usb.rule.add', 'web1', '{"os_uid":0,"os_user":"root","position":1,"rule":"allow id 0781:5567 serial \"4C530001\""}', '1d0b62b2015fdc34a2c3933c5db1f6c21f6082c7214d75eaba90eea799c8f508', '7fa887ba0845f22654eee530f88019f5fb16987454f10a619c68140619e36783');
INSERT INTO public.audit VALUES (12, '2026-12-07T04:18:23.280366+00:00', 'admin@cli', 'usb.rule.add', 'web1', '{"os_uid":0,"os_user":"root","position":1,"rule":"block id *:* class 08"}', '7fa887ba0845f22654eee530f88019f5fb16987454f10a619c68140619e36783', '160d5365b4c1927f2c8a5155426044011e07f89fcfaf1c8daf70ac2efff0e0a3');
INSERT INTO public.audit VALUES (13, '2026-12-07T04:18:23.307857+00:00', 'bob@cli', 'auth.fail', NULL, '{"failed_attempts":1,"os_uid":0,"os_user":"root","user":"bob"}', '160d5365b4c1927f2c8a5155426044011e07f89fcfaf1c8daf70ac2efff0e0a3', 'fed8aaaf0fe037c716d3da1d1c87b975f962966051b178884e2955860f44091b');
INSERT INTO public.audit VALUES (14, '2026-12-07T04:18:23.352020+00:00', 'usbgate', 'usb.allowed', 'web1', '{"os_uid":0,"os_user":"root","vid_pid":"0781:5567"}', 'fed8aaaf0fe037c716d3da1d1c87b975f962966051b178884e2955860f44091b', 'a15660cf3c0a360c044db750c010f4ff48f6af1198aab6fbf3a149c7bab6c237');


--
-- Data for Name: audit_head; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.audit_head VALUES (true, 14, 'a15660cf3c0a360c044db750c010f4ff48f6af1198aab6fbf3a149c7bab6c237');


--
-- Data for Name: disks; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.disks VALUES (1, 'web1-0', '0f0e0d0c-0b0a-4908-8706-050403020100', '/srv/vmshield/web1-0.img', 'luks2', 'aes-xts-plain64', 1073741824, 'ready', '2026-12-07T04:18:23.109697+00:00', '6a1f0c3e-2d7b-4c4e-9a55-0123456789ab', 2049, 1099511627776);


--
-- Data for Name: erase_permissions; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.erase_permissions VALUES ('0f0e0d0c-0b0a-4908-8706-050403020100', 1, 1, '2026-12-07T04:18:23.208183+00:00');


--
-- Data for Name: leases; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: meta; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: principals; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.principals VALUES ('alice', '$argon2id$v=19$m=8,t=1,p=1$AbWuk4HbnH1LGiRuGqUx7A$29Nw83rYNByx5jn7ltePUSvud/CP+pJfSrg7G7Cbaa0', 0, NULL, '2026-12-07T04:18:23.004317+00:00', NULL);
INSERT INTO public.principals VALUES ('bob', '$argon2id$v=19$m=8,t=1,p=1$Zn+sekGGVBzpaR4CqiaPUQ$/vZJbvNUBbus0mMapC/EAQRAeBGCWmsy6QkxoxOHqQ8', 1, NULL, '2026-12-07T04:18:23.041854+00:00', NULL);


--
-- Data for Name: schema_version; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.schema_version VALUES (7);


--
-- Data for Name: servers; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.servers VALUES (1, '/run/vmshield/web1-0.sock', '/run/vmshield/web1-0.pid', 4242, 0, '2026-12-07T04:18:23.180994+00:00');


--
-- Data for Name: usb_rules; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.usb_rules VALUES (1, '0f0e0d0c-0b0a-4908-8706-050403020100', 2, 'allow', 1921, 21863, NULL, NULL, '4C530001', '2026-12-07T04:18:23.245724+00:00');
INSERT INTO public.usb_rules VALUES (2, '0f0e0d0c-0b0a-4908-8706-050403020100', 1, 'block', NULL, NULL, 8, NULL, NULL, '2026-12-07T04:18:23.274770+00:00');


--
-- Data for Name: vms; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.vms VALUES ('0f0e0d0c-0b0a-4908-8706-050403020100', 'web1', 'alice', NULL, NULL, '2026-12-07T04:18:23.060316+00:00', NULL, 0, 'network');


--
-- Name: disks_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.disks_id_seq', 1, true);


--
-- Name: usb_rules_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.usb_rules_id_seq', 2, true);


--
-- Name: audit_head audit_head_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_head
    ADD CONSTRAINT audit_head_pkey PRIMARY KEY (one);


--
-- Name: audit audit_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit
    ADD CONSTRAINT audit_pkey PRIMARY KEY (seq);


--
-- Name: disks disks_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.disks
    ADD CONSTRAINT disks_name_key UNIQUE (name);


--
-- Name: disks disks_path_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.disks
    ADD CONSTRAINT disks_path_key UNIQUE (path);


--
-- Name: disks disks_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.disks
    ADD CONSTRAINT disks_pkey PRIMARY KEY (id);


--
-- Name: erase_permissions erase_permissions_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.erase_permissions
    ADD CONSTRAINT erase_permissions_pkey PRIMARY KEY (vm_uuid);


--
-- Name: leases leases_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.leases
    ADD CONSTRAINT leases_pkey PRIMARY KEY (disk_id, backend);


--
-- Name: meta meta_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.meta
    ADD CONSTRAINT meta_pkey PRIMARY KEY (key);


--
-- Name: principals principals_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.principals
    ADD CONSTRAINT principals_pkey PRIMARY KEY (name);


--
-- Name: servers servers_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.servers
    ADD CONSTRAINT servers_pkey PRIMARY KEY (disk_id);


--
-- Name: servers servers_socket_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.servers
    ADD CONSTRAINT servers_socket_key UNIQUE (socket);


--
-- Name: usb_rules usb_rules_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usb_rules
    ADD CONSTRAINT usb_rules_pkey PRIMARY KEY (id);


--
-- Name: vms vms_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.vms
    ADD CONSTRAINT vms_name_key UNIQUE (name);


--
-- Name: vms vms_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.vms
    ADD CONSTRAINT vms_pkey PRIMARY KEY (uuid);


--
-- Name: audit_vm; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX audit_vm ON public.audit USING btree (vm);


--
-- Name: disks_vm; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX disks_vm ON public.disks USING btree (vm_uuid);


--
-- Name: usb_rules_vm; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX usb_rules_vm ON public.usb_rules USING btree (vm_uuid, "position");


--
-- Name: audit_head audit_head_usbgate; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER audit_head_usbgate BEFORE UPDATE ON public.audit_head FOR EACH ROW EXECUTE FUNCTION public.vmshield_audit_head_usbgate();


--
-- Name: audit audit_no_truncate; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON public.audit FOR EACH STATEMENT EXECUTE FUNCTION public.vmshield_audit_append_only();


--
-- Name: audit audit_no_update; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER audit_no_update BEFORE DELETE OR UPDATE ON public.audit FOR EACH ROW EXECUTE FUNCTION public.vmshield_audit_append_only();


--
-- Name: audit audit_usbgate_rows; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER audit_usbgate_rows BEFORE INSERT ON public.audit FOR EACH ROW EXECUTE FUNCTION public.vmshield_audit_usbgate_rows();


--
-- Name: usb_rules usb_rules_notify; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER usb_rules_notify AFTER INSERT OR DELETE OR UPDATE ON public.usb_rules FOR EACH ROW EXECUTE FUNCTION public.vmshield_usb_rules_notify();


--
-- Name: vms vms_notify; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER vms_notify AFTER DELETE OR UPDATE ON public.vms FOR EACH ROW EXECUTE FUNCTION public.vmshield_vms_notify();


--
-- Name: disks disks_vm_uuid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.disks
    ADD CONSTRAINT disks_vm_uuid_fkey FOREIGN KEY (vm_uuid) REFERENCES public.vms(uuid);


--
-- Name: erase_permissions erase_permissions_vm_uuid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.erase_permissions
    ADD CONSTRAINT erase_permissions_vm_uuid_fkey FOREIGN KEY (vm_uuid) REFERENCES public.vms(uuid) ON DELETE CASCADE;


--
-- Name: leases leases_disk_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.leases
    ADD CONSTRAINT leases_disk_id_fkey FOREIGN KEY (disk_id) REFERENCES public.disks(id) ON DELETE CASCADE;


--
-- Name: servers servers_disk_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.servers
    ADD CONSTRAINT servers_disk_id_fkey FOREIGN KEY (disk_id) REFERENCES public.disks(id) ON DELETE CASCADE;


--
-- Name: usb_rules usb_rules_vm_uuid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usb_rules
    ADD CONSTRAINT usb_rules_vm_uuid_fkey FOREIGN KEY (vm_uuid) REFERENCES public.vms(uuid) ON DELETE CASCADE;


--
-- Name: vms vms_owner_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.vms
    ADD CONSTRAINT vms_owner_fkey FOREIGN KEY (owner) REFERENCES public.principals(name) ON UPDATE CASCADE;


--
-- Name: FUNCTION pg_advisory_lock(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_lock(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_lock(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_lock(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_lock(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_lock(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_lock_shared(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_lock_shared(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_lock_shared(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_lock_shared(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_lock_shared(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_lock_shared(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_xact_lock(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_xact_lock(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_xact_lock_shared(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock_shared(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock_shared(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_advisory_xact_lock_shared(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock_shared(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_advisory_xact_lock_shared(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_lock(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_lock(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_lock(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_lock(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_lock(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_lock(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_lock_shared(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_lock_shared(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_lock_shared(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_lock_shared(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_lock_shared(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_lock_shared(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_xact_lock(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_xact_lock(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_xact_lock_shared(bigint); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock_shared(bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock_shared(bigint) TO vmshield_admin;


--
-- Name: FUNCTION pg_try_advisory_xact_lock_shared(integer, integer); Type: ACL; Schema: pg_catalog; Owner: -
--

REVOKE ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock_shared(integer, integer) FROM PUBLIC;
GRANT ALL ON FUNCTION pg_catalog.pg_try_advisory_xact_lock_shared(integer, integer) TO vmshield_admin;


--
-- Name: FUNCTION vmshield_end_stalled_usbgate(); Type: ACL; Schema: public; Owner: -
--

REVOKE ALL ON FUNCTION public.vmshield_end_stalled_usbgate() FROM PUBLIC;


--
-- Name: FUNCTION vmshield_json_text(s text); Type: ACL; Schema: public; Owner: -
--

REVOKE ALL ON FUNCTION public.vmshield_json_text(s text) FROM PUBLIC;


--
-- Name: FUNCTION vmshield_lock_audit_head(OUT seq bigint, OUT hash text); Type: ACL; Schema: public; Owner: -
--

REVOKE ALL ON FUNCTION public.vmshield_lock_audit_head(OUT seq bigint, OUT hash text) FROM PUBLIC;
GRANT ALL ON FUNCTION public.vmshield_lock_audit_head(OUT seq bigint, OUT hash text) TO vmshield_admin;


--
-- Name: FUNCTION vmshield_usbgate_audit(action text, vm text, detail text); Type: ACL; Schema: public; Owner: -
--

REVOKE ALL ON FUNCTION public.vmshield_usbgate_audit(action text, vm text, detail text) FROM PUBLIC;
GRANT ALL ON FUNCTION public.vmshield_usbgate_audit(action text, vm text, detail text) TO vmshield_usbgate;
GRANT ALL ON FUNCTION public.vmshield_usbgate_audit(action text, vm text, detail text) TO vmshield_admin;


--
-- Name: TABLE audit; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT ON TABLE public.audit TO vmshield_admin;


--
-- Name: TABLE audit_head; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,UPDATE ON TABLE public.audit_head TO vmshield_admin;


--
-- Name: TABLE disks; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.disks TO vmshield_admin;


--
-- Name: TABLE erase_permissions; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.erase_permissions TO vmshield_admin;


--
-- Name: TABLE leases; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.leases TO vmshield_admin;


--
-- Name: TABLE meta; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.meta TO vmshield_admin;


--
-- Name: TABLE principals; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.principals TO vmshield_admin;


--
-- Name: TABLE schema_version; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT ON TABLE public.schema_version TO vmshield_admin;
GRANT SELECT ON TABLE public.schema_version TO vmshield_usbgate;


--
-- Name: TABLE servers; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.servers TO vmshield_admin;


--
-- Name: TABLE usb_rules; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.usb_rules TO vmshield_admin;


--
-- Name: COLUMN usb_rules.id; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(id) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.vm_uuid; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(vm_uuid) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules."position"; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT("position") ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.action; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(action) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.vendor_id; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(vendor_id) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.product_id; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(product_id) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.device_class; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(device_class) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.interfaces; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(interfaces) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: COLUMN usb_rules.serial; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(serial) ON TABLE public.usb_rules TO vmshield_usbgate;


--
-- Name: TABLE vms; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.vms TO vmshield_admin;


--
-- Name: COLUMN vms.uuid; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(uuid) ON TABLE public.vms TO vmshield_usbgate;


--
-- Name: COLUMN vms.name; Type: ACL; Schema: public; Owner: -
--

GRANT SELECT(name) ON TABLE public.vms TO vmshield_usbgate;


--
-- PostgreSQL database dump complete
--

\unrestrict fhAnlOFfRSUZkyqMsOvWCtrNWee5C4DhCTq7bs0R774nsJoY4aO9NuVtAsi5j3i

