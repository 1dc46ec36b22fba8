#!/usr/bin/perl
# DBD::Pg through Weir: server-side prepared statements across many transactions.
#
# Run by tests/drivers.rs against a Weir whose pool has 2 server connections. Several
# processes each connect with pg_switch_prepared => 1 and prepare their statements with
# pg_server_prepare => 1, so every execute, from the first, is Bind/Execute of a statement
# DBD::Pg parsed once per connection under its own name (dbdpg_p<pid>_<n>). They run in
# AutoCommit => 0 transactions, most committed and some rolled back, and each transaction
# checks that the statement really is prepared on the server it runs on; half-way each
# process connects again, with new names for the same queries. Weir must map the names and
# re-prepare the statements on whichever server each transaction lands on. The committed rows
# are checked at the end. Exits non-zero on any error; prints one `dbd-pg ok ...` line.
#
# A statement handle destroyed while connected makes DBD::Pg send the SQL command
# `DEALLOCATE dbdpg_p<pid>_<n>` (`do` with bind values does so inside the transaction, and the
# handles are dropped between transactions at the end): Weir must forget its alias of the
# statement rather than pass the name to a server that never heard of it.
#
# Connection settings come from the environment: WEIR_HOST, WEIR_PORT, WEIR_USER,
# WEIR_PASSWORD, WEIR_DB.
use strict;
use warnings;

use DBI;
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);

my $PROCS  = 4;
my $ROUNDS = 60;
my $ROWS   = 100;

sub connect_db {
    my $dsn = sprintf('dbi:Pg:host=%s;port=%d;dbname=%s',
        $ENV{WEIR_HOST} // '127.0.0.1', $ENV{WEIR_PORT}, $ENV{WEIR_DB});
    return DBI->connect($dsn, $ENV{WEIR_USER}, $ENV{WEIR_PASSWORD},
        { AutoCommit => 0, RaiseError => 1, PrintError => 0, PrintWarn => 1,
          pg_switch_prepared => 1 });
}

sub check {
    my ($cond, $what) = @_;
    die "check failed: $what\n" unless $cond;
}

sub setup {
    my $dbh = connect_db();
    $dbh->do('DROP TABLE IF EXISTS pl_items, pl_ledger');
    $dbh->do('CREATE TABLE pl_items (id int PRIMARY KEY, grp int NOT NULL, name text NOT NULL)');
    $dbh->do("INSERT INTO pl_items SELECT g, g % 10, 'item-' || g "
          . "FROM generate_series(0, ? - 1) g", undef, $ROWS);
    $dbh->do('CREATE TABLE pl_ledger (proc int NOT NULL, rnd int NOT NULL, amount int NOT NULL, '
          . 'PRIMARY KEY (proc, rnd))');
    $dbh->commit;
    $dbh->disconnect;
}

my %SERVER = (pg_server_prepare => 1);

sub prepare_all {
    my ($dbh) = @_;
    return {
        by_id  => $dbh->prepare('SELECT name FROM pl_items WHERE id = $1', \%SERVER),
        in_grp => $dbh->prepare('SELECT count(*) FROM pl_items WHERE grp = $1', \%SERVER),
        add    => $dbh->prepare('SELECT $1::int + $2::int', \%SERVER),
        ledger => $dbh->prepare('INSERT INTO pl_ledger (proc, rnd, amount) VALUES ($1, $2, $3)',
            \%SERVER),
        mine   => $dbh->prepare(
            'SELECT count(*), coalesce(sum(amount), 0) FROM pl_ledger WHERE proc = $1', \%SERVER),
        # The statements are really prepared on the server this transaction runs on.
        held   => $dbh->prepare('SELECT count(*) FROM pg_prepared_statements WHERE statement = $1',
            \%SERVER),
    };
}

sub one_value {
    my ($sth, @args) = @_;
    $sth->execute(@args);
    my @row = $sth->fetchrow_array;
    $sth->finish;
    return wantarray ? @row : $row[0];
}

# One process: returns how many statements it executed, or dies.
sub worker {
    my ($proc) = @_;
    my $done = 0;
    my $dbh  = connect_db();
    my $st   = prepare_all($dbh);
    for my $rnd (0 .. $ROUNDS - 1) {
        if ($rnd == $ROUNDS / 2) {
            # A new connection: its statements are new names for the same queries.
            $dbh->disconnect;
            %$st = ();
            $dbh = connect_db();
            $st  = prepare_all($dbh);
        }
        my $i = ($proc * 17 + $rnd) % $ROWS;
        my $pid = $dbh->selectrow_array('SELECT pg_backend_pid()');
        check(one_value($st->{by_id}, $i) eq "item-$i", "by_id $i");
        check(one_value($st->{in_grp}, $i % 10) == $ROWS / 10, "in_grp $i");
        check(one_value($st->{add}, $proc, $rnd) == $proc + $rnd, "add $proc $rnd");
        # A statement handle made, executed and deallocated inside the transaction.
        check($dbh->do('UPDATE pl_items SET name = name WHERE id = ?', undef, $i) == 1,
            "do with a bind value");
        $st->{ledger}->execute($proc, $rnd, $rnd % 3 == 2 ? 1_000_000 : $rnd + 1);
        check(one_value($st->{held}, 'SELECT name FROM pl_items WHERE id = $1') >= 1,
            "by_id is prepared on the server");
        my $same = $dbh->selectrow_array('SELECT pg_backend_pid()') == $pid;
        check($same, 'one server per transaction');
        $done += 6;
        if ($rnd % 3 == 2) {
            $dbh->rollback;
        } else {
            $dbh->commit;
        }
    }
    my ($rows, $sum) = one_value($st->{mine}, $proc);
    my @kept = grep { $_ % 3 != 2 } 0 .. $ROUNDS - 1;
    my $want = 0;
    $want += $_ + 1 for @kept;
    check($rows == @kept, "proc $proc ledger rows $rows");
    check($sum == $want, "proc $proc ledger sum $sum, want $want");
    $dbh->commit;
    # Handles dropped while connected, between transactions: DEALLOCATE for each.
    %$st = ();
    check($dbh->selectrow_array('SELECT 1') == 1, 'after the statements were deallocated');
    $dbh->commit;
    $dbh->disconnect;
    return $done + 1;
}

sub main {
    setup();
    my $start = clock_gettime(CLOCK_MONOTONIC);
    my %kids;
    for my $proc (0 .. $PROCS - 1) {
        my $pid = fork // die "fork: $!\n";
        if ($pid == 0) {
            my $done = eval { worker($proc) };
            if (!defined $done) {
                print STDERR "dbd-pg FAILED: process $proc: $@";
                exit 1;
            }
            exit 0;
        }
        $kids{$pid} = $proc;
    }
    my $failed = 0;
    while ((my $pid = wait) > 0) {
        if ($? != 0) {
            print STDERR "dbd-pg FAILED: process $kids{$pid} exited with $?\n";
            $failed = 1;
        }
    }
    exit 1 if $failed;

    my $dbh = connect_db();
    my ($rows, $sum) =
      $dbh->selectrow_array('SELECT count(*), coalesce(sum(amount), 0) FROM pl_ledger');
    $dbh->commit;
    $dbh->disconnect;
    my @kept = grep { $_ % 3 != 2 } 0 .. $ROUNDS - 1;
    my $want = 0;
    $want += $_ + 1 for @kept;
    check($rows == $PROCS * @kept, "ledger rows $rows");
    check($sum == $PROCS * $want, "ledger sum $sum, want " . $PROCS * $want);
    printf "dbd-pg ok: processes=%d executes=%d ledger_rows=%d ledger_sum=%d seconds=%.1f\n",
        $PROCS, $PROCS * ($ROUNDS * 6 + 1), $rows, $sum, clock_gettime(CLOCK_MONOTONIC) - $start;
}

eval { main(); 1 } or do {
    print STDERR "dbd-pg FAILED: $@";
    exit 1;
};
