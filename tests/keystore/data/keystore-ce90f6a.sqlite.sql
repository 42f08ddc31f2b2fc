-- made by tests/keystore/data/make_upgrade_fixtures.py at ce90f6a
BEGIN TRANSACTION;
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    vm        TEXT,
    detail    TEXT NOT NULL,                    -- canonical JSON object
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
INSERT INTO "audit" VALUES(1,'2026-12-07T04:18:15.341159+00:00','admin@cli','keystore.init',NULL,'{"os_uid":0,"os_user":"root","schema":3}','0000000000000000000000000000000000000000000000000000000000000000','34b2bf1e1c60f0c0cc9ed3d4d773f6e4121cfc4d5d155f854df5341f1504f427');
INSERT INTO "audit" VALUES(2,'2026-12-07T04:18:15.376507+00:00','admin@cli','user.add',NULL,'{"os_uid":0,"os_user":"root","user":"alice"}','34b2bf1e1c60f0c0cc9ed3d4d773f6e4121cfc4d5d155f854df5341f1504f427','76bbc52bbd1c31a21a5acd67f382c5e35a07da56e6202dc7b30492adec17ebe2');
INSERT INTO "audit" VALUES(3,'2026-12-07T04:18:15.424642+00:00','admin@cli','user.add',NULL,'{"os_uid":0,"os_user":"root","user":"bob"}','76bbc52bbd1c31a21a5acd67f382c5e35a07da56e6202dc7b30492adec17ebe2','8e3a0d68790a24c339044914d01169a15ff4df0d0404d1fdc9db18d809489789');
INSERT INTO "audit" VALUES(4,'2026-12-07T04:18:15.427966+00:00','admin@cli','vm.add','web1','{"domain_uuid":null,"os_uid":0,"os_user":"root","owner":"alice","pool_uuid":null,"uuid":"0f0e0d0c-0b0a-4908-8706-050403020100"}','8e3a0d68790a24c339044914d01169a15ff4df0d0404d1fdc9db18d809489789','57ce74be6c73780641e322c223bbab37d0682d435ff9a99ca2b61545e8d6c747');
INSERT INTO "audit" VALUES(5,'2026-12-07T04:18:15.429434+00:00','admin@cli','disk.add','web1','{"cipher":"aes-xts-plain64","disk":"web1-0","format":"luks2","os_uid":0,"os_user":"root","path":"/srv/vmshield/web1-0.img","size":1073741824,"state":"creating"}','57ce74be6c73780641e322c223bbab37d0682d435ff9a99ca2b61545e8d6c747','0ff1112957aca5fe55f0b2259003392e7d8b3f83efc88e677505642d2430e476');
INSERT INTO "audit" VALUES(6,'2026-12-07T04:18:15.430543+00:00','admin@cli','disk.identity','web1','{"disk":"web1-0","luks_uuid":"6a1f0c3e-2d7b-4c4e-9a55-0123456789ab","os_uid":0,"os_user":"root","st_dev":2049,"st_ino":1099511627776}','0ff1112957aca5fe55f0b2259003392e7d8b3f83efc88e677505642d2430e476','6a8570cde7a426346007a49b50434149635ef735952804cceb66862238067648');
INSERT INTO "audit" VALUES(7,'2026-12-07T04:18:15.431622+00:00','admin@cli','disk.state','web1','{"disk":"web1-0","from":"creating","os_uid":0,"os_user":"root","to":"ready"}','6a8570cde7a426346007a49b50434149635ef735952804cceb66862238067648','daeaef0f10f13e0541cbc0bd4a56f524e319b71a1daaf7ba77765da83d6fcd3b');
INSERT INTO "audit" VALUES(8,'2026-12-07T04:18:15.432709+00:00','admin@cli','disk.serve','web1','{"disk":"web1-0","os_uid":0,"os_user":"root","pid":4242,"readonly":false,"socket":"/run/vmshield/web1-0.sock"}','daeaef0f10f13e0541cbc0bd4a56f524e319b71a1daaf7ba77765da83d6fcd3b','45d6da96937c44912bdd45c5c07708f274d076e4cd1e7a6b49f3f7fb873d660f');
INSERT INTO "audit" VALUES(9,'2026-12-07T04:18:15.433947+00:00','admin@cli','perm.set','web1','{"deep_erase":true,"normal_delete":true,"os_uid":0,"os_user":"root"}','45d6da96937c44912bdd45c5c07708f274d076e4cd1e7a6b49f3f7fb873d660f','965f508055744a2d2da60ea335e30de7cb05124bd30bc2b74bf6af7e17577492');
INSERT INTO "audit" VALUES(10,'2026-12-07T04:18:15.434716+00:00','admin@cli','vm.set','web1','{"os_uid":0,"os_user":"root","unlock":"network"}','965f508055744a2d2da60ea335e30de7cb05124bd30bc2b74bf6af7e17577492','063a968c344efa7ee13e3df268b41d42a86ff05c105dd8f58c83f88fcfa8b108');
INSERT INTO "audit" VALUES(11,'2026-12-07T04:18:15.435913+00:00','admin@cli','usb.rule.add','web1','{"os_uid":0,"os_user":"root","position":1,"rule":"allow id 0781:5567 serial \"4C530001\""}','063a968c344efa7ee13e3df268b41d42a86ff05c105dd8f58c83f88fcfa8b108','a4bbca9a0c79262b5cd87d56fe7aba59a9a7f5daa9a56f011d794baca179483a');
INSERT INTO "audit" VALUES(12,'2026-12-07T04:18:15.437347+00:00','admin@cli','usb.rule.add','web1','{"os_uid":0,"os_user":"root","position":1,"rule":"block id *:* class 08"}','a4bbca9a0c79262b5cd87d56fe7aba59a9a7f5daa9a56f011d794baca179483a','acb61e52f33fca5a99901044e9b4ec3b1ec651a6c58ccfe217fffd4f640a444c');
INSERT INTO "audit" VALUES(13,'2026-12-07T04:18:15.438834+00:00','bob@cli','auth.fail',NULL,'{"failed_attempts":1,"os_uid":0,"os_user":"root","user":"bob"}','acb61e52f33fca5a99901044e9b4ec3b1ec651a6c58ccfe217fffd4f640a444c','96daa98a51fc762e19d73dc26d247079170dce4efbdc4b72354fa74e298b34a1');
INSERT INTO "audit" VALUES(14,'2026-12-07T04:18:15.473410+00:00','usbgate','usb.allowed','web1','{"os_uid":0,"os_user":"root","vid_pid":"0781:5567"}','96daa98a51fc762e19d73dc26d247079170dce4efbdc4b72354fa74e298b34a1','c994ce2b8c7b22444e15f3328adbe4a86ec525018eb09d9d2dbaa1eed05682a4');
CREATE TABLE disks (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    vm_uuid TEXT NOT NULL REFERENCES vms(uuid),
    path    TEXT NOT NULL UNIQUE,
    format  TEXT NOT NULL,
    cipher  TEXT NOT NULL,
    size    INTEGER NOT NULL CHECK (size > 0),
    state   TEXT NOT NULL
            CHECK (state IN ('creating', 'ready', 'destroying', 'destroyed', 'failed')),
    created TEXT NOT NULL
, luks_uuid TEXT, st_dev INTEGER, st_ino INTEGER);
INSERT INTO "disks" VALUES(1,'web1-0','0f0e0d0c-0b0a-4908-8706-050403020100','/srv/vmshield/web1-0.img','luks2','aes-xts-plain64',1073741824,'ready','2026-12-07T04:18:15.429238+00:00','6a1f0c3e-2d7b-4c4e-9a55-0123456789ab',2049,1099511627776);
CREATE TABLE erase_permissions (
    vm_uuid       TEXT PRIMARY KEY REFERENCES vms(uuid) ON DELETE CASCADE,
    deep_erase    INTEGER NOT NULL CHECK (deep_erase IN (0, 1)),
    normal_delete INTEGER NOT NULL CHECK (normal_delete IN (0, 1)),
    updated       TEXT NOT NULL
);
INSERT INTO "erase_permissions" VALUES('0f0e0d0c-0b0a-4908-8706-050403020100',1,1,'2026-12-07T04:18:15.433695+00:00');
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO "meta" VALUES('audit_head','14:c994ce2b8c7b22444e15f3328adbe4a86ec525018eb09d9d2dbaa1eed05682a4');
CREATE TABLE principals (
    name            TEXT PRIMARY KEY,
    verifier        TEXT NOT NULL,              -- argon2id PHC string (RFC 9106)
    failed_attempts INTEGER NOT NULL DEFAULT 0, -- consecutive failures since last success
    locked_until    TEXT,                       -- refused without checking until then
    created         TEXT NOT NULL,
    last_login      TEXT
);
INSERT INTO "principals" VALUES('alice','$argon2id$v=19$m=8,t=1,p=1$bVXbPhAEA0+ZyIAmrLQfBA$PDeetlGoQB3zhoZWlAuB1Xe0FF98+/MXc3JeAE7bnrw',0,NULL,'2026-12-07T04:18:15.376309+00:00',NULL);
INSERT INTO "principals" VALUES('bob','$argon2id$v=19$m=8,t=1,p=1$rpc4R6cou4WZRh37pELlhw$xwgafvOZLf39T8Wtxnb88qmuaYjonN4tLJeWHIr5vZs',1,NULL,'2026-12-07T04:18:15.424496+00:00',NULL);
CREATE TABLE servers (
    disk_id  INTEGER PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
    socket   TEXT NOT NULL UNIQUE,
    pidfile  TEXT NOT NULL,
    pid      INTEGER NOT NULL,
    readonly INTEGER NOT NULL CHECK (readonly IN (0, 1)),
    started  TEXT NOT NULL
);
INSERT INTO "servers" VALUES(1,'/run/vmshield/web1-0.sock','/run/vmshield/web1-0.pid',4242,0,'2026-12-07T04:18:15.432487+00:00');
CREATE TABLE usb_rules (
    id           INTEGER PRIMARY KEY,
    vm_uuid      TEXT NOT NULL REFERENCES vms(uuid) ON DELETE CASCADE,
    position     INTEGER NOT NULL,              -- 1-based order within the VM
    action       TEXT NOT NULL CHECK (action IN ('allow', 'block', 'reject')),
    vendor_id    INTEGER,                       -- NULL = '*'
    product_id   INTEGER,                       -- NULL = '*'
    device_class INTEGER,                       -- NULL = any
    interfaces   TEXT,                          -- JSON list of "CC:SS:PP" patterns, NULL = any
    serial       TEXT,                          -- NULL = any
    created      TEXT NOT NULL
);
INSERT INTO "usb_rules" VALUES(1,'0f0e0d0c-0b0a-4908-8706-050403020100',2,'allow',1921,21863,NULL,NULL,'4C530001','2026-12-07T04:18:15.435657+00:00');
INSERT INTO "usb_rules" VALUES(2,'0f0e0d0c-0b0a-4908-8706-050403020100',1,'block',NULL,NULL,8,NULL,NULL,'2026-12-07T04:18:15.437176+00:00');
CREATE TABLE vms (
    uuid         TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    owner        TEXT NOT NULL REFERENCES principals(name) ON UPDATE CASCADE,
    pool_uuid    TEXT,                          -- storage pool
    domain_uuid  TEXT,                          -- storage domain
    created      TEXT NOT NULL,
    last_access  TEXT,
    access_count INTEGER NOT NULL DEFAULT 0
, unlock_policy TEXT NOT NULL DEFAULT 'any'
    CHECK (unlock_policy IN ('owner', 'network', 'host-key', 'any')));
INSERT INTO "vms" VALUES('0f0e0d0c-0b0a-4908-8706-050403020100','web1','alice',NULL,NULL,'2026-12-07T04:18:15.427588+00:00',NULL,0,'network');
CREATE INDEX disks_vm ON disks(vm_uuid);
CREATE INDEX usb_rules_vm ON usb_rules(vm_uuid, position);
CREATE INDEX audit_vm ON audit(vm);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('audit',14);
COMMIT;
PRAGMA user_version = 3;
