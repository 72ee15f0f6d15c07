"""${message}

Create Date: ${create_date}
"""

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

## The ids are written once, here, where Alembic reads them (`alembic history -v` prints them).
revision, down_revision = ${repr(up_revision)}, ${repr(down_revision)}
## Alembic reads branch_labels and depends_on where a revision has them, and takes None otherwise.
% if branch_labels:
branch_labels = ${repr(branch_labels)}
% endif
% if depends_on:
depends_on = ${repr(depends_on)}
% endif


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
